"""Claims of the geometry of the space (RQ3), decided on one model's geometry table and the relations table.

Every claim is read at one middle layer: the measured layer nearest relative depth 1/2, the shallower on a
tie (``detail`` says which). Intervals are 95 % percentile bootstraps over the measured documents (pairs of
tokens or passages weighted by their two documents' draw counts; changes paired on the same draws), and over
(model, register) points for the correlation.

- ``anisotropy_rises`` (Ethayarajh 2019): mean cosine of random token pairs from different documents at the
  middle layer minus at the first measured layer (the embeddings) > 0.
- ``rogue_dimensions_dominate`` (Timkey & van Schijndel 2021): the top k = 3 dimensions contribute more than
  half of Σ|CC_i| (the expected cosine's per-dimension contributions) of raw states: share > 0.5.
- ``standardisation_removes_dominance``: the same share after standardisation < 0.5.
- ``separability_after_processing``: how well cosine of pooled passage states separates same- from
  different-register pairs (ROC AUC) changes after post-processing in the direction Timkey & van Schijndel
  report for standardisation: ΔAUC (processed − raw) > 0, one row per post-processing.
- ``geometry_performance``: Spearman ρ over registers between intrinsic dimension (TwoNN, raw states, middle
  band) and bits-per-byte > 0 (harder registers occupy more dimensions; our hypothesis, after Cheng et al.
  2025's link between intrinsic dimension and perplexity). With eight points its interval is wide.
"""

from collections.abc import Mapping
from typing import Any

import polars as pl

from latent_atlas.claims import Claim

SHARE_THRESHOLD = 0.5
TOP_K = 3
RELATION = {"metric": "twonn", "processing": "none", "band": "middle", "measure": "bits_per_byte"}


def inputs(config: Mapping[str, Any], model: str, corpus: str) -> dict[str, str]:
    """The model's geometry table and the corpus's geometry–performance relations (every run model)."""
    if model not in config.get("run", {}).get("models", []):
        return {}
    return {
        "metrics": f"results/geometry/{model}/{corpus}.parquet",
        "relations": f"results/geometry/{corpus}.relations.parquet",
    }


def middle_layer(metrics: pl.DataFrame) -> int:
    """The measured layer whose relative depth is nearest 1/2 (on a tie, the shallower one)."""
    layers = metrics.select("layer", "relative_depth").unique().sort("layer")
    distance = (layers["relative_depth"] - 0.5).abs().round(9)
    return int(layers["layer"][int(distance.arg_min())])


def _row(metrics: pl.DataFrame, layer: int, processing: str, metric: str) -> dict[str, Any] | None:
    """The all-register row of one metric, or None."""
    rows = metrics.filter(
        (pl.col("layer") == layer) & (pl.col("processing") == processing) & (pl.col("metric") == metric)
        & (pl.col("register") == "all")
    )  # fmt: skip
    return rows.row(0, named=True) if rows.height else None


def _claim(row: dict[str, Any], **fields: Any) -> Claim:
    """A claim whose estimate and interval are a metric row's (documents resampled)."""
    n = row.get("documents") if row.get("documents") is not None else row["n"]
    return Claim.from_row(row, n=n, unit=row.get("unit") or "document", **fields)


def claims(tables: Mapping[str, pl.DataFrame], config: Mapping[str, Any], model: str, corpus: str) -> list[Claim]:
    """Anisotropy, rogue dimensions (raw and standardised), separability after post-processing, correlation."""
    result = []
    metrics = tables.get("metrics")
    if metrics is not None and metrics.height:
        result += space_claims(metrics)
    relations = tables.get("relations")
    if relations is not None and relations.height:
        result += relation_claims(relations, model)
    return result


def space_claims(metrics: pl.DataFrame) -> list[Claim]:
    """The anisotropy, rogue-dimension and separability claims at the middle layer."""
    layer = middle_layer(metrics)
    first = int(metrics["layer"].min())
    detail = f"layer {layer}"
    result = []
    row = _row(metrics, layer, "none", "mean_cosine_change")
    if row is not None:
        result.append(
            _claim(
                row,
                claim="anisotropy_rises",
                paper="Ethayarajh 2019",
                finding="anisotropy (mean cosine of random pairs) rises after the embedding layer",
                statistic=f"mean cosine at layer {layer} − at layer {first}",
                threshold=0.0,
                holds_when="above",
                detail=detail,
                note="token pairs from different documents; documents resampled, paired across layers",
            )
        )
    for processing, side, claim, finding in (
        ("none", "above", "rogue_dimensions_dominate", "a handful of dimensions dominate cosine similarity"),
        ("standardise", "below", "standardisation_removes_dominance", "standardisation removes that dominance"),
    ):
        row = _row(metrics, layer, processing, f"cosine_top{TOP_K}_share")
        if row is None:
            continue
        result.append(
            _claim(
                row,
                claim=claim,
                paper="Timkey & van Schijndel 2021",
                finding=finding,
                statistic=f"share of Σ|CC_i| of the expected cosine from the top {TOP_K} dimensions ({processing})",
                threshold=SHARE_THRESHOLD,
                holds_when=side,
                detail=detail,
                note="the top dimensions are re-chosen in every replicate",
            )
        )
    changes = metrics.filter(
        (pl.col("layer") == layer) & (pl.col("metric") == "passage_register_auc_change") & (pl.col("register") == "all")
    )
    for row in changes.sort("processing").iter_rows(named=True):
        result.append(
            _claim(
                row,
                claim="separability_after_processing",
                paper="Timkey & van Schijndel 2021",
                finding="register separability by cosine improves after post-processing",
                statistic=f"ROC AUC of same- vs different-register passage pairs, {row['processing']} − raw",
                threshold=0.0,
                holds_when="above",
                detail=f"{detail}, {row['processing']}",
                note="passage (mean-pooled) states of the measured split; passages resampled, paired with raw",
            )
        )
    return result


def relation_claims(relations: pl.DataFrame, model: str) -> list[Claim]:
    """Spearman ρ (TwoNN vs bits-per-byte over registers, middle band) within ``model``, with its n."""
    rows = relations.filter(pl.col("level") == f"registers within {model}")
    for key, value in RELATION.items():
        rows = rows.filter(pl.col(key) == value)
    if rows.is_empty() or "ci_low" not in rows.columns:
        return []
    row = rows.row(0, named=True)
    return [
        Claim.from_row(
            row,
            estimate="spearman",
            claim="geometry_performance",
            paper="RQ3 (latent-atlas), after Cheng et al. 2025",
            finding="registers whose states have a higher intrinsic dimension are harder to predict",
            statistic="Spearman ρ(TwoNN at middle depth, bits per byte) over registers",
            threshold=0.0,
            holds_when="above",
            detail=f"{model}, middle band",
            note=f"{row['n']} points (registers of one model): a wide interval; below 3 points it is NaN",
        )
    ]
