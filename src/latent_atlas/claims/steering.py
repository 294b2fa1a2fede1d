"""Steering claims: the published effects of ActAdd, mean-difference vectors, ICV, ITI and optimised vectors.

Every statistic is paired where the design pairs: a steered continuation against the unsteered one of the same
prompt, sample and decoding (one sampling seed), resampled by prompt with the decodings pooled; an ITI item at
strength α against the same item at α = 0, resampled by item. Where a claim picks a strength on the data (the
best below fluency collapse, the best α within the KL bound), its interval is Bonferroni-widened over the ``k``
strengths searched (confidence 1 − 0.05/k), so a winner among noisy settings does not pass as an effect.

Thresholds: sentiment and accuracy changes must exceed 0; fluency has collapsed when the geometric mean of the
steered/unsteered perplexity ratio (perplexity under the unsteered model) exceeds 2 (the continuation is on
average half as probable per token: Δ log-perplexity > log 2); ITI's off-target KL bound is 0.5 nats on
neutral text; an optimised vector "exists" for a sentence set when the exact-recovery rate exceeds 0.9.
Steering does not read a corpus: the same rows appear in every corpus's claims.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from latent_atlas.claims import Claim
from latent_atlas.config import analysis_models
from latent_atlas.names import STEERING_METHODS
from latent_atlas.stats import DEFAULT_CONFIDENCE, Interval, bootstrap_mean, paired_differences
from latent_atlas.steering.summary import ITEM, PAIR_ON, PROMPT, TARGET, iti_items

COLLAPSE_RATIO = 2.0  # perplexity ratio steered / unsteered beyond which fluency has collapsed
KL_BOUND = 0.5  # nats of off-target KL within which ITI's α may be chosen
RECOVERY_RATE = 0.9  # exact-recovery rate for "a vector that reproduces each sentence exists"
CEILING = 0.95  # a base truth accuracy above which ITI has no room to show an effect

PAPERS = {
    "actadd": "Turner et al. 2023 (ActAdd)",
    "mean_difference": "Turner et al. 2023 (finding), contrastive mean-difference vector",
    "icv": "Liu et al. 2024 (in-context vectors)",
    "iti": "Li et al. 2023 (inference-time intervention)",
    "optimised": "Subramani et al. 2022 (optimised steering vectors)",
}


def inputs(config: Mapping[str, Any], model: str, corpus: str) -> dict[str, str]:
    """The steering tables of the configured methods, when ``model`` is one steering runs on (any corpus)."""
    section = config.get("steering") or {}
    if model not in analysis_models(config, "steering"):
        return {}
    methods = [method for method in section.get("methods") or [] if method in STEERING_METHODS]
    return {method: f"results/steering/{model}/{method}.parquet" for method in methods}


def claims(tables: Mapping[str, pl.DataFrame], config: Mapping[str, Any], model: str, corpus: str) -> list[Claim]:
    """Every steering claim the given tables decide (one row per method × layer where that applies)."""
    seed = int((config.get("steering") or {}).get("seed", 0))
    rows: list[Claim] = []
    for method in ("actadd", "mean_difference"):
        if method in tables:
            for _, layer_rows in tables[method].group_by("layer", maintain_order=True):
                rows += [raises_sentiment(layer_rows, method, seed), collapses_fluency(layer_rows, method, seed)]
    if "icv" in tables:
        rows.append(icv_moves_sentiment(tables["icv"], seed))
    if "iti" in tables:
        rows.append(iti_raises_truth(tables["iti"], seed))
    if "optimised" in tables:
        rows += [optimised_recovers(layer_rows, seed) for _, layer_rows in tables["optimised"].group_by("layer")]
    return rows


def _paired(rows: pl.DataFrame, value: str, coefficient: float) -> pl.DataFrame:
    """Steered − unsteered ``value`` per (prompt, sample, decoding) at one strength."""
    return paired_differences(rows, value, "coefficient", coefficient, 0.0, PAIR_ON)


def _log_perplexity(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.with_columns(log_perplexity=pl.col("perplexity").log())


def _prompt_interval(differences: pl.DataFrame, value: str, seed: int, confidence: float) -> Interval:
    return bootstrap_mean(
        differences[value].to_numpy(),
        differences["prompt_id"].to_numpy(),
        unit=PROMPT,
        seed=seed,
        confidence=confidence,
    )


def _bonferroni(k: int) -> float:
    """The confidence that keeps a 5 % family-wise error over ``k`` strengths searched."""
    return 1 - (1 - DEFAULT_CONFIDENCE) / max(k, 1)


def _where(method: str, layer: int) -> str:
    return "all blocks (MLP outputs)" if method == "icv" else f"resid.{layer:02d}"


def _strengths(rows: pl.DataFrame) -> list[float]:
    return sorted(c for c in set(rows["coefficient"].to_list()) if c != 0)


def _claim(key: str, method: str, finding: str, statistic: str, interval: Interval, **fields: Any) -> Claim:
    return Claim.from_interval(
        interval, claim=key, paper=PAPERS[method], finding=finding, statistic=statistic, **fields
    )


def raises_sentiment(rows: pl.DataFrame, method: str, seed: int = 0) -> Claim:
    """Δ sentiment vs unsteered at the best strength below fluency collapse (one method, one layer) > 0.

    "Below collapse": the strength's geometric-mean perplexity ratio to unsteered is under :data:`COLLAPSE_RATIO`
    (point estimate). The best is the one with the largest mean Δ; its interval is Bonferroni-widened over the
    strengths below collapse. The note says whether mean sentiment rises monotonically up to it.
    """
    rows = _log_perplexity(rows)
    layer = int(rows["layer"][0])
    changes = {c: (_paired(rows, "sentiment", c), _paired(rows, "log_perplexity", c)) for c in _strengths(rows)}
    fluent = [
        c for c, (_, log_ratio) in changes.items() if log_ratio["log_perplexity"].mean() < math.log(COLLAPSE_RATIO)
    ]
    finding = "steering raises sentiment monotonically up to a strength"
    where = f"{method} · {_where(method, layer)}"
    if not fluent:
        empty = Interval(float("nan"), float("nan"), float("nan"), rows["prompt_id"].n_unique(), PROMPT)
        note = f"every strength at least {COLLAPSE_RATIO:g}× the unsteered perplexity: no strength below collapse"
        return _claim(
            "steering_raises_sentiment",
            method,
            finding,
            "mean paired Δ sentiment: none below collapse",
            empty,
            threshold=0.0,
            holds_when="above",
            detail=where,
            note=note,
        )
    best = max(fluent, key=lambda c: changes[c][0]["sentiment"].mean())
    confidence = _bonferroni(len(fluent))
    interval = _prompt_interval(changes[best][0], "sentiment", seed, confidence)
    means = rows.group_by("coefficient").agg(pl.col("sentiment").mean()).sort("coefficient")
    rising = means.filter(pl.col("coefficient") <= best)["sentiment"].to_numpy()
    monotone = bool(np.all(np.diff(rising) >= 0))
    statistic = (
        f"mean paired Δ sentiment (VADER compound, steered − unsteered on the same prompt, sample and decoding) "
        f"at the strength with the largest Δ whose perplexity ratio to unsteered is < {COLLAPSE_RATIO:g}; "
        f"{confidence:.1%} interval (Bonferroni over k = {len(fluent)} strengths)"
    )
    trend = ", ".join(f"{c:g}: {s:+.3f}" for c, s in means.iter_rows())
    note = (
        f"mean sentiment by strength {trend}; {'monotone' if monotone else 'not monotone'} up to {best:g}; "
        f"decodings pooled ({', '.join(sorted(set(rows['decoding'])))})"
    )
    return _claim(
        "steering_raises_sentiment",
        method,
        finding,
        statistic,
        interval,
        threshold=0.0,
        holds_when="above",
        detail=f"{where} · strength {best:g}",
        note=note,
    )


def collapses_fluency(rows: pl.DataFrame, method: str, seed: int = 0) -> Claim:
    """Geometric-mean perplexity ratio steered / unsteered at the largest strength > :data:`COLLAPSE_RATIO`."""
    rows = _log_perplexity(rows)
    layer, strongest = int(rows["layer"][0]), max(_strengths(rows))
    log_interval = _prompt_interval(
        _paired(rows, "log_perplexity", strongest), "log_perplexity", seed, DEFAULT_CONFIDENCE
    )
    interval = Interval(
        *(math.exp(v) for v in (log_interval.estimate, log_interval.low, log_interval.high)),
        log_interval.n,
        log_interval.unit,
    )
    onset = [
        c
        for c in _strengths(rows)
        if _paired(rows, "log_perplexity", c)["log_perplexity"].mean() > math.log(COLLAPSE_RATIO)
    ]
    statistic = (
        f"perplexity ratio steered / unsteered (perplexity under the unsteered model; geometric mean over paired "
        f"continuations = exp of mean paired Δ log-perplexity) at the largest strength; collapse: > {COLLAPSE_RATIO:g}"
    )
    note = f"point ratio first exceeds {COLLAPSE_RATIO:g} at strength {onset[0]:g}" if onset else "never exceeds it"
    return _claim(
        "steering_collapses_fluency",
        method,
        "beyond that strength, fluency collapses",
        statistic,
        interval,
        threshold=COLLAPSE_RATIO,
        holds_when="above",
        detail=f"{method} · {_where(method, layer)} · strength {strongest:g}",
        note=note,
    )


def icv_moves_sentiment(rows: pl.DataFrame, seed: int = 0) -> Claim:
    """Paired Δ sentiment at ICV's largest λ > 0 (the note gives the perplexity ratio there)."""
    rows = _log_perplexity(rows)
    strongest = max(_strengths(rows))
    interval = _prompt_interval(_paired(rows, "sentiment", strongest), "sentiment", seed, DEFAULT_CONFIDENCE)
    ratio = math.exp(_paired(rows, "log_perplexity", strongest)["log_perplexity"].mean())
    statistic = "mean paired Δ sentiment (VADER compound, steered − unsteered) at the largest λ; 95% interval"
    note = f"perplexity ratio to unsteered at λ = {strongest:g}: {ratio:.2f} (geometric mean)"
    return _claim(
        "icv_moves_sentiment",
        "icv",
        "an in-context vector moves the target attribute (sentiment)",
        statistic,
        interval,
        threshold=0.0,
        holds_when="above",
        detail=f"icv · {_where('icv', 0)} · λ {strongest:g}",
        note=note,
    )


def iti_raises_truth(table: pl.DataFrame, seed: int = 0) -> Claim:
    """Paired Δ truth accuracy vs α = 0 on test items at the best α with off-target KL < :data:`KL_BOUND` > 0."""
    finding = "ITI raises truth accuracy on held-out items at bounded off-target KL"
    bounded = table.filter(pl.col("coefficient") != 0, pl.col("off_target_kl") < KL_BOUND)["coefficient"].to_list()
    if "test_item_margins" not in table.columns or not bounded:
        n = int(table["test_items"][0]) if "test_items" in table.columns else 0
        why = "no α > 0 within the KL bound" if bounded == [] else "the table predates per-item margins"
        return _claim(
            "iti_raises_truth",
            "iti",
            finding,
            f"paired Δ truth accuracy: {why}",
            Interval(float("nan"), float("nan"), float("nan"), n, ITEM),
            threshold=0.0,
            holds_when="above",
            detail="iti",
            note=f"{why}; rerun steer_heads" if "predates" in why else why,
        )
    items = iti_items(table)
    changes = {a: paired_differences(items, "correct", "coefficient", a, 0.0, ["item"]) for a in bounded}
    best = max(bounded, key=lambda a: changes[a]["correct"].mean())
    confidence = _bonferroni(len(bounded))
    interval = bootstrap_mean(
        changes[best]["correct"].to_numpy(),
        changes[best]["item"].to_numpy(),
        unit=ITEM,
        seed=seed,
        confidence=confidence,
    )
    base_rows = items.filter(pl.col("coefficient") == 0)
    base = bootstrap_mean(base_rows["correct"].to_numpy(), base_rows["item"].to_numpy(), unit=ITEM, seed=seed)
    kl = float(table.filter(pl.col("coefficient") == best)["off_target_kl"][0])
    ceiling = "at ceiling" if base.low >= CEILING else "not at ceiling"
    statistic = (
        f"mean paired Δ truth accuracy (α vs 0 on the same test item) at the best α whose off-target KL on neutral "
        f"text is < {KL_BOUND:g} nats; {confidence:.1%} interval (Bonferroni over k = {len(bounded)} α)"
    )
    note = (
        f"base accuracy (α = 0) {base.estimate:.3f} [{base.low:.3f}, {base.high:.3f}] ({ceiling}, ceiling "
        f"{CEILING:g}); off-target KL at α = {best:g}: {kl:.3f} nats; heads {int(table['heads'][0])}"
    )
    return _claim(
        "iti_raises_truth",
        "iti",
        finding,
        statistic,
        interval,
        threshold=0.0,
        holds_when="above",
        detail=f"iti · α {best:g}",
        note=note,
    )


def optimised_recovers(rows: pl.DataFrame, seed: int = 0) -> Claim:
    """Exact-recovery rate over target sentences > :data:`RECOVERY_RATE` (one layer)."""
    exact = rows["exact_match"].cast(pl.Float64).to_numpy()
    interval = bootstrap_mean(exact, rows["target_id"].to_numpy(), unit=TARGET, seed=seed)
    layer = int(rows["layer"][0])
    note = f"mean BLEU {float(rows['bleu'].mean()):.1f} (0–100)"
    if exact.size and exact.min() == exact.max():
        # a percentile bootstrap of an all-or-nothing sample has no spread; the exact binomial bound says more
        bound = (1 - DEFAULT_CONFIDENCE) / 2
        side = (
            f"lower bound {bound ** (1 / exact.size):.3f}"
            if exact[0] == 1
            else f"upper bound {1 - bound ** (1 / exact.size):.3f}"
        )
        note += f"; all {exact.size} alike: the bootstrap interval is degenerate, the exact (Clopper–Pearson) {side}"
    statistic = (
        f"exact-recovery rate over target sentences (greedy decoding reproduces the sentence); > {RECOVERY_RATE:g}"
    )
    return _claim(
        "optimised_vectors_recover",
        "optimised",
        "a steering vector that reproduces each target sentence exists",
        statistic,
        interval,
        threshold=RECOVERY_RATE,
        holds_when="above",
        detail=f"optimised · resid.{layer:02d}",
        note=note,
    )
