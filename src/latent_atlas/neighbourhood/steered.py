"""Where steered continuations' states sit relative to the data, and what the lenses read there (RQ2).

The steering sweeps keep the residual states of every generated token at a few layers
(:class:`latent_atlas.steering.generate.StateCapture`). Each state is placed as the neighbourhood rules place
their samples (:meth:`latent_atlas.neighbourhood.pipeline._Layer.data_position`): its Euclidean distance to the
nearest stored state of the same layer, set against the local spacing of the data there, the distance from that
stored state to its own nearest other stored state. A ratio near 1 is a state among the data; well above 1,
off it. Lenses read each state: their top-1 token, and whether it is the model's own next token.

Where the nearest stored state has an identical twin among the stored states (a repeated document or opening),
the local spacing there is zero and the ratio undefined: it is left null, and the summary's means leave it out.
``NeighbourhoodSettings.steered_states`` caps the states placed per (method, steered layer, decoding, strength)
at a uniform draw (seeded), so that the cost of a sweep's placement does not grow with its samples and length.

Intervals resample prompts: every sample and every generated token of one prompt goes in or out together.
"""

import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch

from latent_atlas.addresses import resid_address
from latent_atlas.lenses.base import Lens
from latent_atlas.models import LoadedModel
from latent_atlas.neighbourhood.pipeline import NeighbourhoodSettings, _Layer
from latent_atlas.stats import DEFAULT_REPLICATES, bootstrap_mean
from latent_atlas.steering.generate import read_states
from latent_atlas.store import ActivationStore

LENSES = ("logit", "tuned")
SUMMARY_VALUES = ("distance_ratio", *(f"{lens}_agrees" for lens in LENSES))


def local_spacing(at: _Layer, rows: np.ndarray, decode: Any) -> np.ndarray:
    """Per stored row, the distance (relative to the typical norm) to its nearest *other* stored state."""
    unique, inverse = np.unique(rows, return_inverse=True)
    placed = at.data_position(at.store.read(at.layer, unique), decode, own_rows=unique)
    return placed["nn_distance"][inverse]


def distance_ratios(nn_distance: np.ndarray, spacing: np.ndarray) -> pl.Series:
    """``nn_distance / spacing``, null where the local spacing is zero (the ratio is undefined there)."""
    ratio = np.divide(nn_distance, spacing, out=np.full(len(spacing), np.nan), where=spacing > 0)
    return pl.Series("distance_ratio", ratio).fill_nan(None)


def subsample_states(records: pl.DataFrame, method: str, limit: int | None, seed: int) -> pl.DataFrame:
    """At most ``limit`` records per (steered layer, decoding, strength), drawn uniformly (all when ``None``).

    The draw depends on ``seed`` and ``method`` only, not on the order methods are placed in.
    """
    if limit is None:
        return records
    rng = np.random.default_rng([seed, zlib.crc32(method.encode())])
    draw = pl.Series("_draw", rng.random(records.height))
    rank = pl.col("_draw").rank("ordinal").over(["layer", "decoding", "coefficient"])
    return records.with_columns(draw).filter(rank <= limit).drop("_draw")


def _lens_columns(
    lenses: Mapping[str, Lens], states: np.ndarray, layer: int, own_next: np.ndarray, loaded: LoadedModel
) -> dict[str, Any]:
    """Each lens's top-1 token of every state and whether it is the model's own next token (null: cannot read)."""
    columns: dict[str, Any] = {}
    for name, lens in lenses.items():
        if not lens.reads(layer):
            columns |= {f"{name}_top1": [None] * len(states), f"{name}_agrees": [None] * len(states)}
            continue
        with torch.no_grad():
            h = torch.from_numpy(states).to(loaded.device, next(lens.parameters()).dtype)
            top1 = lens.logits(h, layer).argmax(-1).cpu().numpy()
        columns[f"{name}_top1"] = [loaded.tokenizer.decode([int(i)]) for i in top1]
        columns[f"{name}_agrees"] = (top1 == own_next).astype(np.float64)
    return columns


def place_states(
    loaded: LoadedModel,
    store: ActivationStore,
    method: str,
    records: pl.DataFrame,
    states: Mapping[int, np.ndarray],
    lenses: Mapping[str, Lens],
    settings: NeighbourhoodSettings,
) -> pl.DataFrame:
    """One row per (kept generated state, captured layer the store holds): placement and lens readings.

    ``records`` and ``states`` are what :func:`latent_atlas.steering.generate.read_states` returns; states after
    a row's first EOS are left out, and at most ``settings.steered_states`` of the rest are placed per (steered
    layer, decoding, strength). The steered layer is ``steered_layer``; the captured one ``layer``.
    """
    kept = subsample_states(records.filter(~pl.col("after_eos")), method, settings.steered_states, settings.seed)
    index = kept["state"].to_numpy()
    decode = loaded.tokenizer.decode
    tables = []
    for layer in sorted(set(states) & set(store.layers)):
        at = _Layer.open(store, layer, settings)
        layer_states = states[layer][index]
        placed = at.data_position(layer_states, decode)
        spacing = local_spacing(at, placed["nn_row"], decode)
        lens_columns = _lens_columns(lenses, layer_states, layer, kept["model_top1_id"].to_numpy(), loaded)
        tables.append(
            kept.rename({"layer": "steered_layer"}).with_columns(
                pl.lit(resid_address(layer)).alias("address"),
                pl.lit(layer).alias("layer"),
                pl.lit(at.statistics.typical_norm).alias("typical_norm"),
                pl.Series("nn_row", placed["nn_row"]),
                pl.Series("nn_distance", placed["nn_distance"]),
                pl.Series("nn_context", placed["nn_context"]),
                pl.Series("local_spacing", spacing),
                distance_ratios(placed["nn_distance"], spacing),
                **{name: pl.Series(name, values) for name, values in lens_columns.items()},
            )
        )
    if not tables:
        return pl.DataFrame()
    tokens = {i: decode([i]) for i in kept["token_id"].unique().to_list()}
    table = pl.concat(tables, how="diagonal_relaxed").with_columns(
        pl.lit(method).alias("method"), pl.col("token_id").replace_strict(tokens, return_dtype=pl.String).alias("token")
    )
    attrs = store.attrs
    return table.with_columns(model=pl.lit(attrs["model"]), corpus=pl.lit(attrs["corpus"]))


def place_steered_states(
    loaded: LoadedModel,
    store: ActivationStore,
    states_files: Mapping[str, str | os.PathLike[str]],
    lenses: Mapping[str, Lens],
    settings: NeighbourhoodSettings,
) -> pl.DataFrame:
    """:func:`place_states` for every method's captured states (``states_files``: method -> states file)."""
    tables = []
    for method, path in states_files.items():
        records, states, _ = read_states(path)
        tables.append(place_states(loaded, store, method, records, states, lenses, settings))
    return pl.concat([table for table in tables if table.height], how="diagonal_relaxed")


def summarise_placement(
    table: pl.DataFrame,
    values: Sequence[str] = SUMMARY_VALUES,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> pl.DataFrame:
    """Mean of each value per (method, steered layer, captured layer, decoding, strength), resampling prompts.

    Columns: the keys, ``value`` (which quantity), ``estimate``, ``ci_low``, ``ci_high``, ``n`` (prompts), ``unit``,
    and ``states`` (how many generated states went in).
    """
    keys = ["method", "steered_layer", "layer", "decoding", "coefficient"]
    rows = []
    for group_key, group in table.group_by(keys, maintain_order=True):
        for value in values:
            if value not in group.columns or group[value].null_count() == group.height:
                continue
            data = group.drop_nulls(value)
            interval = bootstrap_mean(
                data[value].to_numpy(), data["prompt_id"].to_numpy(), unit="prompt", replicates=replicates, seed=seed
            )
            rows.append(
                dict(zip(keys, group_key, strict=True))
                | {"value": value, "estimate": interval.estimate, **interval.columns(), "states": data.height}
            )
    return pl.DataFrame(rows).sort([*keys[:-1], "value", "coefficient"]) if rows else pl.DataFrame()
