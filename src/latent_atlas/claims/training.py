"""Claims of the training family: members specialise, and geometry goes with performance (RQ3).

The family does not depend on the model or corpus a claims table is for: its claims are repeated in the table
of every model of ``run.models``, on the family's analysis corpus (``training.analysis.corpus``, else the first
of ``run.corpora``) only, and each row's note says so.

Geometry against performance: the project's hypothesis (RQ3; the degeneration view of anisotropy, Gao et al.
2019) is that a more anisotropic space goes with worse language modelling and a more isotropic, higher-rank one
with better. So Spearman's ρ with bits per byte (lower is better) should be above 0 for the mean cosine of
random pairs and below 0 for IsoScore and the effective rank / width, read on raw states in the late third of
the layers, across models (n = models) and across model × register points (n = points, which are not
independent: one model's registers share it).
"""

import math
from collections.abc import Mapping
from typing import Any, Literal

import polars as pl

from latent_atlas.claims import Claim
from latent_atlas.training.family import family_name

SPECIALISATION_KEY = "member_best_on_own_register"
RELATION_KEY = "geometry_tracks_performance"
RELATION_BAND = "late"
RELATION_LEVELS = {"models": "model", "registers": "model × register"}
# metric -> the side of 0 on which Spearman's ρ with bits per byte lies if the hypothesis holds
HYPOTHESES: dict[str, Literal["above", "below"]] = {
    "mean_cosine": "above",
    "isoscore": "below",
    "effective_rank_fraction": "below",
}
METRIC_LABELS = {
    "mean_cosine": "mean cosine (anisotropy)",
    "isoscore": "IsoScore",
    "effective_rank_fraction": "effective rank / width",
}


def home_corpus(config: Mapping[str, Any]) -> str:
    """The corpus whose claims tables carry the family's claims: its analysis corpus, else the first studied."""
    analysis = (config["training"].get("analysis") or {}).get("corpus")
    return analysis or config["run"]["corpora"][0]


def inputs(config: Mapping[str, Any], model: str, corpus: str) -> dict[str, str]:
    """The family's specialisation and relations tables, for each studied model on the family's corpus."""
    family = family_name(config)
    if not family or model not in config["run"]["models"] or corpus != home_corpus(config):
        return {}
    return {name: f"results/training/{family}/{name}.parquet" for name in ("specialisation", "relations")}


def _shared(config: Mapping[str, Any]) -> str:
    return f"family {family_name(config)}: the same rows in every model's table"


def specialisation_claims(table: pl.DataFrame, config: Mapping[str, Any]) -> list[Claim]:
    """Each single-register member is best on its own register: Δ bits per byte (best other − own) > 0."""
    if "delta_bits_per_byte" not in table.columns:
        return []
    claims = []
    for row in table.filter(pl.col("own_member").is_not_null()).iter_rows(named=True):
        claims.append(
            Claim.from_row(
                row,
                estimate="delta_bits_per_byte",
                claim=SPECIALISATION_KEY,
                paper="latent-atlas family (controlled RQ3 experiment)",
                finding="each single-register member is best on its own register",
                statistic="Δ bits per byte (best other member − own member), paired by test document",
                threshold=0.0,
                holds_when="above",
                detail=f"{row['register']} · {row['own_member']}",
                note=f"best other member at the estimate: {row['best_other_member']} (chosen anew in each resample); "
                f"{_shared(config)}",
            )
        )
    return claims


def relation_claims(table: pl.DataFrame, config: Mapping[str, Any]) -> list[Claim]:
    """Spearman's ρ of each hypothesised metric with bits per byte lies on the hypothesis's side of 0."""
    bounded = {"ci_low", "ci_high"} <= set(table.columns)
    rows = table.filter(
        pl.col("level").is_in(list(RELATION_LEVELS)) & (pl.col("processing") == "none")
        & (pl.col("band") == RELATION_BAND) & (pl.col("measure") == "bits_per_byte")
        & pl.col("metric").is_in(list(HYPOTHESES))
    )  # fmt: skip
    claims = []
    for row in rows.sort("metric", "level").iter_rows(named=True):
        low, high = (row[c] if bounded and row[c] is not None else math.nan for c in ("ci_low", "ci_high"))
        side = HYPOTHESES[row["metric"]]
        few = "; few points: the interval is wide or missing" if row["n"] < 10 else ""
        missing = "" if bounded else "; the relations table has no interval (re-run summarise_family)"
        claims.append(
            Claim(
                claim=RELATION_KEY,
                paper="latent-atlas RQ3 hypothesis (anisotropy as degeneration: Gao et al., ICLR 2019)",
                finding="geometry goes with performance: more anisotropic worse, more isotropic / higher rank better",
                statistic=f"Spearman ρ of {METRIC_LABELS[row['metric']]} (raw states, late layers) with bits per byte, "
                f"hypothesis ρ {'>' if side == 'above' else '<'} 0",
                estimate=math.nan if row["spearman"] is None else row["spearman"],
                ci_low=low,
                ci_high=high,
                n=row["n"],
                unit=row.get("unit") or RELATION_LEVELS[row["level"]],
                threshold=0.0,
                holds_when=side,
                detail=f"{row['metric']} · across {row['level']}",
                note=f"{row.get('n_models', '?')} models; points resampled as independent{few}{missing}; "
                f"{_shared(config)}",
            )
        )
    return claims


def claims(tables: Mapping[str, pl.DataFrame], config: Mapping[str, Any], model: str, corpus: str) -> list[Claim]:
    """The family's claims from its specialisation and relations tables."""
    found: list[Claim] = []
    if "specialisation" in tables:
        found += specialisation_claims(tables["specialisation"], config)
    if "relations" in tables:
        found += relation_claims(tables["relations"], config)
    return found
