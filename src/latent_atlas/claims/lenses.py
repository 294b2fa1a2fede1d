"""Claims of the lens family (Belrose et al. 2023), decided on the lens evaluation of one model × corpus.

- ``logit_lens_last_layer``: at the last layer the logit lens is the model's own head, so KL(p_final ‖ p_logit)
  is zero up to storage rounding: the upper bound of its document-bootstrap interval lies below 1e-6 nats.
- ``tuned_below_logit``: the tuned lens's KL to the final distribution is below the logit lens's at every
  layer read: per layer, the mean paired difference KL(tuned) − KL(logit) over the same held-out tokens lies
  below 0 (documents resampled); the row ``every layer`` tests the largest of those differences, with the same
  document draws at every layer, so it holds only if every layer's difference is below 0 together.
"""

from collections.abc import Mapping
from typing import Any

import polars as pl

from latent_atlas.claims import Claim
from latent_atlas.config import analysis_models

PAPER = "Belrose et al. 2023 (tuned lens)"
LAST_LAYER_BOUND = 1e-6
METRIC = "kl_to_final"


def inputs(config: Mapping[str, Any], model: str, corpus: str) -> dict[str, str]:
    """The lens curves and their per-document sums, when the lens section runs on ``model``."""
    if model not in analysis_models(config, "lenses"):  # lenses.models null: every model of run.models
        return {}
    return {
        "curves": f"results/lenses/{model}/{corpus}.parquet",
        "documents": f"results/lenses/{model}/{corpus}.documents.parquet",
    }


def claims(tables: Mapping[str, pl.DataFrame], config: Mapping[str, Any], model: str, corpus: str) -> list[Claim]:
    """The last-layer logit-lens claim and the tuned-below-logit claim (per layer and over every layer)."""
    result = []
    if "curves" in tables:
        result += last_layer_claim(tables["curves"])
    if "documents" in tables:
        result += tuned_below_logit(tables["documents"])
    return result


def last_layer_claim(curves: pl.DataFrame) -> list[Claim]:
    """KL(p_final ‖ p_logit lens) at the last layer read, with its upper bound against 1e-6 nats."""
    rows = curves.filter((pl.col("lens") == "logit") & (pl.col("metric") == METRIC))
    if rows.is_empty():
        return []
    row = rows.sort("layer").row(-1, named=True)
    return [
        Claim.from_row(
            row,
            claim="logit_lens_last_layer",
            paper=PAPER,
            finding="the logit lens at the last layer reproduces the model's distribution (KL < 1e-6)",
            statistic="mean KL(p_final ‖ p_logit) at the last layer [nats]",
            threshold=LAST_LAYER_BOUND,
            holds_when="below",
            detail=f"layer {row['layer']}",
            note="KL is 0 only in exact arithmetic: states stored in float16 round the final norm's input "
            "(extraction.dtype float32 removes that rounding)",
        )
    ]


def tuned_below_logit(documents: pl.DataFrame, replicates: int = 1000, seed: int = 0) -> list[Claim]:
    """Per layer, and over every layer (the maximum), the paired difference KL(tuned) − KL(logit) < 0."""
    if not {"tuned", "logit"} <= set(documents["lens"].unique()):
        return []
    last = int(documents["layer"].max())  # both lenses are the model's own head there: Δ = 0 by construction
    read = documents.filter(pl.col("layer") != last)
    if read.is_empty():
        return []
    from latent_atlas.lenses.evaluate import paired_lens_difference  # torch: not at DAG-building time

    table = paired_lens_difference(read, METRIC, "tuned", "logit", replicates, seed)
    result = []
    for row in table.iter_rows(named=True):
        every = row["layer"] == -1
        result.append(
            Claim.from_row(
                row,
                claim="tuned_below_logit",
                paper=PAPER,
                finding="the tuned lens's KL to the final distribution is below the logit lens's at every layer",
                statistic=(
                    "max over layers of mean paired ΔKL (tuned − logit) [nats]" if every
                    else "mean paired ΔKL (tuned − logit) [nats]"
                ),
                threshold=0.0,
                holds_when="below",
                detail="every layer" if every else f"layer {row['layer']}",
                note="same tokens for both lenses; documents resampled" + (
                    f", the same draws at every layer; the last layer ({last}) is left out (Δ = 0 there by "
                    "construction)" if every else ""
                ),
            )
        )  # fmt: skip
    return result
