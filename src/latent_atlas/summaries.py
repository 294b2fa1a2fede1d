"""Summaries of a store that figures and checks read: long-format polars tables."""

import os

import numpy as np
import polars as pl

from latent_atlas.store import ActivationStore

_BLOCK_ROWS = 8192


def layer_norms(store_path: str | os.PathLike[str]) -> pl.DataFrame:
    """Mean L2 norm of the stored states per address, label and position group.

    Position 0 is reported apart ("first") from all later positions ("rest"): first-token states are
    attention sinks with huge norms (METHODS §0.4). Reads one block of rows at a time.

    Returns:
        Columns ``model``, ``corpus``, ``address``, ``layer`` (null for ``ln_final``), ``label``,
        ``position`` (first | rest), ``mean_norm``, ``n_tokens``.
    """
    with ActivationStore(store_path) as store:
        tokens = store.tokens().join(
            store.docs().with_row_index("doc").select(pl.col("doc").cast(pl.Int32), "label"), on="doc"
        )
        group = tokens.select(
            "label", position=pl.when(pl.col("pos") == 0).then(pl.lit("first")).otherwise(pl.lit("rest"))
        )
        frames = []
        for address in store.addresses:
            norms = np.concatenate(
                [
                    np.linalg.norm(store.read(address, slice(start, start + _BLOCK_ROWS)), axis=1)
                    for start in range(0, store.n_tokens, _BLOCK_ROWS)
                ]
            )
            frames.append(group.with_columns(norm=pl.Series(norms), address=pl.lit(address)))
        attrs = store.attrs
    table = (
        pl.concat(frames)
        .group_by("address", "label", "position", maintain_order=True)
        .agg(mean_norm=pl.col("norm").mean(), n_tokens=pl.len())
    )
    layer = pl.col("address").str.extract(r"^resid\.(\d+)$").cast(pl.Int32)
    return table.with_columns(model=pl.lit(attrs["model"]), corpus=pl.lit(attrs["corpus"]), layer=layer).select(
        "model", "corpus", "address", "layer", "label", "position", "mean_norm", "n_tokens"
    )
