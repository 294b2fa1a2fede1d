"""The ``latent-atlas`` command: ad-hoc use of the same library functions the workflow calls."""

import argparse
import json
import sys
from collections.abc import Sequence

from latent_atlas.errors import LatentAtlasError


def _inspect(args: argparse.Namespace) -> None:
    """Validate a store and print its provenance, layers and contents."""
    import polars as pl

    from latent_atlas.store import ActivationStore

    with ActivationStore(args.store) as store:
        attrs = store.attrs
        docs = store.docs()
        if args.json:
            print(json.dumps({**attrs, "n_tokens": store.n_tokens, "n_docs": docs.height}, indent=2, default=str))
            return
        print(f"{args.store}: valid latent-atlas store (format {attrs['format_version']})")
        for key in ("model", "model_sha256", "corpus", "corpus_sha256", "config_hash", "code_version", "created"):
            print(f"  {key:<14} {attrs[key]}")
        print(f"  {'dtype':<14} {attrs['dtype']}  (model computed in {attrs.get('model_dtype', '?')})")
        print(f"  {'tokens':<14} {store.n_tokens} rows x d={store.d_model} in {docs.height} documents")
        print(f"  {'addresses':<14} {', '.join(store.addresses)}")
        summary = docs.group_by("label", "split").agg(docs=pl.len(), tokens=pl.col("token_count").sum())
        with pl.Config(tbl_rows=100, tbl_hide_dataframe_shape=True):
            print(summary.sort("label", "split"))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="latent-atlas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="validate an activation store and describe it")
    inspect.add_argument("store", help="path to results/activations/{model}/{corpus}.h5")
    inspect.add_argument("--json", action="store_true", help="print the provenance as JSON")
    inspect.set_defaults(handler=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input prints its message (problem and fix) and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except LatentAtlasError as error:
        print(f"latent-atlas: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
