"""The ``latent-atlas`` command: ad-hoc use of the same library functions the workflow calls."""

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from latent_atlas.errors import ConfigError, LatentAtlasError

if TYPE_CHECKING:
    from latent_atlas.lenses.tuned import TunedLens
    from latent_atlas.models import LoadedModel


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


def _probe(args: argparse.Namespace) -> None:
    """Read texts (or a vector) at one or more layers with every lens and patchscope; print a table or JSON."""
    import torch

    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: give 1 or more")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _read_probe(args)
    finally:
        torch.set_num_threads(previous)


def _read_probe(args: argparse.Namespace) -> None:
    """:func:`_probe` on its threads."""
    from latent_atlas.lenses.pipeline import build_lenses
    from latent_atlas.lenses.probe import (
        format_point,
        load_vector,
        model_pinvs,
        probe_layers,
        probe_points,
        read_point,
        read_texts_file,
    )
    from latent_atlas.models import load_model

    texts = read_texts_file(args.texts_file) if args.texts_file else None
    if args.text == "":
        raise ConfigError("--text is empty: give a text of at least one token")
    loaded = load_model(args.model, device=args.device)
    layers = probe_layers("all" if args.layers else args.layer, loaded.n_layers)
    tuned, tuned_path, tuned_line = _probe_tuned_lens(args, loaded)
    lenses = build_lenses(loaded, {}, tuned, pinvs=model_pinvs(loaded))
    options = {"k": args.k, "targets": args.targets.split(","), "max_new_tokens": args.max_new_tokens}
    if args.vector:
        vector = load_vector(args.vector, loaded.d_model)
        readings = [read_point(loaded, lenses, vector, layer, **options) for layer in layers]
        points = [{"vector": args.vector, "readings": readings}]
    else:
        points = probe_points(loaded, lenses, texts or [args.text], layers, args.position, **options)
    name, sha = loaded.manifest["name"], loaded.manifest["weights_sha256"]
    if args.json:
        header = {"model": name, "model_dir": str(args.model), "model_sha256": sha, "tuned_lens": tuned_path}
        print(json.dumps({**header, "points": points}, indent=2, ensure_ascii=False))
        return
    print(f"{name}  weights sha256 {sha[:16]}…  {tuned_line}")
    for point in points:
        print(f"\n{format_point(point, args.k)}")


def _probe_tuned_lens(args: argparse.Namespace, loaded: "LoadedModel") -> tuple["TunedLens | None", str | None, str]:
    """The tuned lens to read: ``--tuned``, else the model's own trained one (none with ``--no-tuned``).

    Returns the lens, its path and a line saying which lens is read (or why none is).
    """
    from latent_atlas.lenses.base import Unembed
    from latent_atlas.lenses.probe import describe_tuned, find_tuned_lens
    from latent_atlas.lenses.tuned import TunedLens

    if args.no_tuned:
        return None, None, "tuned lens: off (--no-tuned)"
    unembed = Unembed.from_parts(loaded.parts)
    if args.tuned:
        return TunedLens.load(args.tuned, unembed), args.tuned, f"tuned lens: {args.tuned}"
    chosen, candidates = find_tuned_lens(args.model)
    if chosen is None:
        return None, None, describe_tuned(None, [], "none trained beside the model; pass --tuned to read one")
    try:
        return TunedLens.load(chosen, unembed), str(chosen), describe_tuned(chosen, candidates)
    except LatentAtlasError as error:
        print(f"latent-atlas: not reading the tuned lens: {error}", file=sys.stderr)
        return None, None, describe_tuned(None, [], f"{chosen} does not fit this model")


def _neighbours(args: argparse.Namespace) -> None:
    """List the exact nearest stored states of a point, with the text around each one's token."""
    import polars as pl

    from latent_atlas.models import load_model
    from latent_atlas.neighbourhood.pipeline import NeighbourhoodSettings, neighbours_of_point, open_store

    loaded = load_model(args.model, device="cpu")
    point = {"vector": args.vector} if args.vector else {"text": args.text, "position": args.position}
    settings = NeighbourhoodSettings(neighbours_k=args.k, context_tokens=args.context)
    with open_store(args.store, loaded) as store:
        table = neighbours_of_point(
            loaded, store, "command-line", {"command-line": {**point, "layer": args.layer}}, settings
        )
    table = table.filter(pl.col("metric") == args.metric, pl.col("standardised") == args.standardise)
    if args.json:
        print(json.dumps(table.drop("point").to_dicts(), indent=2, ensure_ascii=False))
        return
    similarity = "cosine" if args.metric == "cosine" else "distance"
    print(f"{table['address'][0]}: {args.k} nearest stored states by {args.metric}", end="")
    print(" (standardised)" if args.standardise else "")
    for row in table.iter_rows(named=True):
        context = row["context"].replace("\n", " ")
        print(f"{row['rank']:>3}  {similarity} {row['score']:8.3f}  {row['label'] or '-':<26} {context}")


def _findings(args: argparse.Namespace) -> None:
    """Render claims tables: print the full table, or write it (--full) and a summary into a file's section."""
    import os
    from pathlib import Path

    import polars as pl

    from latent_atlas.claims.report import findings_markdown, findings_summary, replace_section, table_source
    from latent_atlas.provenance import atomic_output

    missing = [path for path in args.tables if not Path(path).is_file()]
    if missing:
        raise ConfigError(f"no claims table at {', '.join(missing)}: run the workflow first (rule decide_claims)")
    table = pl.concat([pl.read_parquet(path) for path in args.tables], how="diagonal_relaxed")
    full = findings_markdown(table, args.source or ", ".join(table_source(path) for path in args.tables))
    if not args.write:
        print(full, end="")
        return
    if not args.full:
        raise ConfigError("--write needs --full FILE: the summary it writes points to the full table there")
    target = Path(args.write)
    link = os.path.relpath(args.full, target.parent)
    try:
        text = replace_section(target.read_text(), findings_summary(table, link))
    except ValueError as error:
        raise ConfigError(f"{target}: {error}") from None
    with atomic_output(args.full) as tmp:
        tmp.write_text(f"# Findings\n\n{full}")
    with atomic_output(target) as tmp:
        tmp.write_text(text)


def _config(args: argparse.Namespace) -> None:
    """Check config files as the workflow reads them; name the file, line and key of each problem."""
    from pathlib import Path

    from latent_atlas.config import check_config_files

    files = [args.base, *(path for path in args.overlays if Path(path).resolve() != Path(args.base).resolve())]
    config = check_config_files(files, args.schema, args.models)
    print(f"config OK: {' + '.join(files)} (run.models: {', '.join(config['run']['models'])})")


def _add_point_arguments(command: argparse.ArgumentParser, layer_help: str) -> None:
    """The arguments that name a point: ``--text`` (with ``--position``) or ``--vector``, and ``--layer``."""
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="take the state of this text ...")
    source.add_argument("--vector", help="... or load it from a .npy file of shape (d,)")
    command.add_argument("--layer", type=int, required=True, help=layer_help)
    command.add_argument("--position", type=int, default=-1, help="token position in --text (default: last)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="latent-atlas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="validate an activation store and describe it")
    inspect.add_argument("store", help="path to results/activations/{model}/{corpus}.h5")
    inspect.add_argument("--json", action="store_true", help="print the provenance as JSON")
    inspect.set_defaults(handler=_inspect)

    probe = commands.add_parser("probe", help="read texts or a point at some layers with every lens and patchscope")
    probe.add_argument("--model", required=True, help="a model directory, e.g. results/models/smollm2-135m")
    source = probe.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="read the state of this text ...")
    source.add_argument("--texts-file", help="... or of each line of this file (one model load for all) ...")
    source.add_argument("--vector", help="... or a saved state: a .npy file of shape (d,)")
    depth = probe.add_mutually_exclusive_group(required=True)
    depth.add_argument("--layer", type=int, nargs="+", help="residual layers: 0 = embeddings .. L = last block")
    depth.add_argument("--layers", choices=["all"], help="all: every residual layer 0..L")
    probe.add_argument("--position", type=int, default=-1, help="token position in each text (default: last)")
    tuned = probe.add_mutually_exclusive_group()
    tuned.add_argument(
        "--tuned", help="a tuned lens (default: the model's own, {results}/lenses/{model}/*.tuned-lens.pt)"
    )
    tuned.add_argument("--no-tuned", action="store_true", help="read no tuned lens, even where one is trained")
    probe.add_argument("--k", type=int, default=8, help="tokens per lens")
    probe.add_argument("--targets", default="identity,entity_description", help="patchscope target prompts")
    probe.add_argument("--max-new-tokens", type=int, default=20, help="patchscope generation length")
    probe.add_argument("--device", default="auto", help="auto, cpu or cuda")
    probe.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: generating one token at a time, the patchscopes run 2-6x faster on one "
        "thread than on two that share busy cores)",
    )
    probe.add_argument("--json", action="store_true", help="print the full reading as JSON")
    probe.set_defaults(handler=_probe)

    neighbours = commands.add_parser("neighbours", help="list a point's exact nearest stored states and their text")
    neighbours.add_argument("store", help="path to results/activations/{model}/{corpus}.h5")
    neighbours.add_argument("--model", required=True, help="the model directory the store was made with")
    _add_point_arguments(neighbours, "residual layer (must be in the store)")
    neighbours.add_argument("--k", type=int, default=10, help="neighbours to list")
    neighbours.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    neighbours.add_argument("--standardise", action="store_true", help="z-score every dimension first")
    neighbours.add_argument("--context", type=int, default=8, help="tokens of text each side")
    neighbours.add_argument("--json", action="store_true", help="print the rows as JSON")
    neighbours.set_defaults(handler=_neighbours)

    check = commands.add_parser("config", help="check config files before a run (names file, line and key)")
    check.add_argument("overlays", nargs="*", help="overlay files, as given to snakemake --configfile")
    check.add_argument("--base", default="config/config.yaml", help="the Snakefile's own configfile")
    check.add_argument("--schema", default="workflow/schemas/config.schema.yaml", help="the config schema")
    check.add_argument("--models", default="results/models", help="where acquired models (their depth) are")
    check.set_defaults(handler=_config)

    findings = commands.add_parser("findings", help="render claims tables (results/claims/*.parquet) as Markdown")
    findings.add_argument("tables", nargs="+", help="claims tables, e.g. results/claims/smollm2-135m.registers.parquet")
    findings.add_argument("--write", help="a Markdown file whose findings section (between markers) gets a summary")
    findings.add_argument("--full", help="with --write: the Markdown file the full table is written to")
    findings.add_argument("--source", help="how the text names where the tables came from (default: their paths)")
    findings.set_defaults(handler=_findings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input prints its message (problem and fix) and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except LatentAtlasError as error:
        print(f"latent-atlas: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latent-atlas: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
