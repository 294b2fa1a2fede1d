"""Per-setting summaries of the steering tables, each with its 95 % bootstrap interval over the right unit.

Generation methods (ActAdd, mean difference, ICV): the unit is the prompt (the samples of one prompt are
resampled together) and a steered continuation is paired with the unsteered one (coefficient 0 of the same
layer) of the same prompt, sample and decoding, which shares its sampling seed. Sentiment is averaged; perplexity
is summarised on the log scale (a geometric mean, and the steered/unsteered ratio of the pair), because one
collapsed continuation's perplexity in the thousands would otherwise be the whole arithmetic mean.

ITI: the unit is the test statement item (its true and false completions), paired across strengths; each head's
probe accuracy on the test statements resamples the same items (an item's true and false statement together,
:func:`iti_probe_intervals`). Optimised vectors: the unit is the target sentence.

:func:`steering_summary` writes the long table ``results/steering/{model}/summary.parquet``: one row per
(method, layer, decoding, coefficient, measure, statistic) with ``estimate``, ``ci_low``, ``ci_high``, ``n`` and
``unit``, and the setting's off-target KL and relative norm where the method has them.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from latent_atlas.names import GENERATION_METHODS
from latent_atlas.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_REPLICATES,
    INTERVAL_SCHEMA,
    bootstrap_mean,
    summarise,
    summarise_paired,
)

PAIR_ON = ("prompt_id", "sample", "decoding")
PROMPT, ITEM, TARGET = "prompt", "statement item", "target sentence"

MEAN, DIFFERENCE = "mean", "paired difference from unsteered"
GEOMETRIC_MEAN, RATIO = "geometric mean", "paired ratio to unsteered"

SUMMARY_SCHEMA = {
    "method": pl.String,
    "layer": pl.Int64,
    "decoding": pl.String,
    "coefficient": pl.Float64,
    "measure": pl.String,
    "statistic": pl.String,
    "estimate": pl.Float64,
    **INTERVAL_SCHEMA,
    "off_target_kl": pl.Float64,
    "relative_norm": pl.Float64,
}


def _long(table: pl.DataFrame, value: str, measure: str, statistic: str) -> pl.DataFrame:
    """A summary's value column renamed to ``estimate``, labelled with its measure and statistic."""
    return table.rename({value: "estimate"}).with_columns(measure=pl.lit(measure), statistic=pl.lit(statistic))


def _exponentiated(table: pl.DataFrame) -> pl.DataFrame:
    """Estimate and bounds on the log scale back to the ratio scale (percentile bounds map through exp)."""
    return table.with_columns(pl.col("estimate", "ci_low", "ci_high").exp())


def generation_summary(
    table: pl.DataFrame,
    by: Sequence[str] = ("method", "layer", "decoding"),
    *,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pl.DataFrame:
    """Per group of ``by`` and coefficient: mean sentiment, geometric-mean perplexity, and both paired to 0.

    ``table`` is a generation sweep (one row per continuation). Leave ``decoding`` out of ``by`` to pool the
    decodings (pairs stay within one decoding; the prompt stays the unit). Strength 0 must be present in every
    group; it has level rows but no paired rows.
    """
    by = list(by)
    rows = table.with_columns(log_perplexity=pl.col("perplexity").log())
    options = {"unit": PROMPT, "replicates": replicates, "confidence": confidence, "seed": seed}
    level = [*by, "coefficient"]
    paired = ("coefficient", 0.0, by, "prompt_id", PAIR_ON)
    sentiment = summarise(rows, "sentiment", level, "prompt_id", **options)
    log_perplexity = summarise(rows, "log_perplexity", level, "prompt_id", **options)
    sentiment_change = summarise_paired(rows, "sentiment", *paired, **options)
    log_ratio = summarise_paired(rows, "log_perplexity", *paired, **options)
    parts = [
        _long(sentiment, "sentiment", "sentiment", MEAN),
        _exponentiated(_long(log_perplexity, "log_perplexity", "perplexity", GEOMETRIC_MEAN)),
        _long(sentiment_change, "sentiment", "sentiment", DIFFERENCE),
        _exponentiated(_long(log_ratio, "log_perplexity", "perplexity", RATIO)),
    ]
    summary = pl.concat(parts, how="diagonal_relaxed")
    setting_columns = [column for column in ("off_target_kl", "relative_norm") if column in table.columns]
    if setting_columns:
        keys = [key for key in ("method", "layer", "coefficient") if key in summary.columns]
        settings = table.group_by(keys).agg(pl.col(setting_columns).first())
        summary = summary.join(settings, on=keys, how="left")
    return summary


def iti_items(table: pl.DataFrame) -> pl.DataFrame:
    """ITI's per-item rows (item, coefficient, margin, correct) from the per-strength table's margin lists."""
    if "test_item_margins" not in table.columns:
        raise ValueError("iti table has no test_item_margins (written before per-item margins were kept)")
    return (
        table.select("coefficient", "test_item_margins")
        .with_columns(item=pl.int_ranges(pl.col("test_item_margins").list.len()))
        .explode("test_item_margins", "item")
        .rename({"test_item_margins": "margin"})
        .with_columns(correct=(pl.col("margin") > 0).cast(pl.Float64))
    )


def iti_summary(
    table: pl.DataFrame,
    *,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pl.DataFrame:
    """Per strength α: truth accuracy on the test items and its paired change from α = 0, items resampled.

    A table written before per-item margins were kept gets its accuracies without an interval (NaN bounds).
    """
    settings = table.select("coefficient", *(c for c in ("off_target_kl", "relative_norm") if c in table.columns))
    if "test_item_margins" not in table.columns:
        level = table.select(
            "coefficient", estimate="test_truth_accuracy", n=pl.col("test_items").cast(pl.Int64), unit=pl.lit(ITEM),
            ci_low=pl.lit(float("nan")), ci_high=pl.lit(float("nan")),
        )  # fmt: skip
        return level.with_columns(measure=pl.lit("truth_accuracy"), statistic=pl.lit(MEAN)).join(
            settings, on="coefficient"
        )
    items = iti_items(table)
    options = {"unit": ITEM, "replicates": replicates, "confidence": confidence, "seed": seed}
    accuracy = summarise(items, "correct", ["coefficient"], "item", **options)
    change = summarise_paired(items, "correct", "coefficient", 0.0, [], "item", ["item"], **options)
    parts = [_long(accuracy, "correct", "truth_accuracy", MEAN), _long(change, "correct", "truth_accuracy", DIFFERENCE)]
    return pl.concat(parts, how="diagonal_relaxed").join(settings, on="coefficient", how="left")


PROBE_INTERVAL_COLUMNS = ("ci_low", "ci_high", "shuffled_ci_low", "shuffled_ci_high", "n", "unit")


def iti_probe_intervals(
    probes: pl.DataFrame,
    *,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pl.DataFrame:
    """Each head's test probe accuracy with its item-bootstrap interval, and its shuffled-label control's.

    Adds ``ci_low``, ``ci_high`` (of ``test_accuracy``), ``shuffled_ci_low``, ``shuffled_ci_high`` (of
    ``shuffled_test_accuracy``), ``n`` test items and ``unit``.
    ``test_correct`` / ``shuffled_test_correct`` list each test statement's correctness in the order of
    :meth:`Statements.texts` (item ``i`` is statements ``2i`` and ``2i + 1``); the item is resampled, both its
    statements together, with one seed for every head and both probes (the same item draws throughout). A
    table written before the lists were kept gets NaN bounds.
    """
    if "test_correct" not in probes.columns:
        nan = pl.lit(float("nan"))
        return probes.with_columns(ci_low=nan, ci_high=nan, shuffled_ci_low=nan, shuffled_ci_high=nan,
                                   n=pl.col("test_statements").cast(pl.Int64) // 2, unit=pl.lit(ITEM))  # fmt: skip
    options = {"unit": ITEM, "replicates": replicates, "confidence": confidence, "seed": seed}
    records = []
    for correct, shuffled in probes.select("test_correct", "shuffled_test_correct").iter_rows():
        items = np.arange(len(correct)) // 2
        level = bootstrap_mean(np.asarray(correct, dtype=np.float64), items, **options)
        control = bootstrap_mean(np.asarray(shuffled, dtype=np.float64), items, **options)
        records.append({**level.columns(), "shuffled_ci_low": control.low, "shuffled_ci_high": control.high})
    schema = {"ci_low": pl.Float64, "ci_high": pl.Float64, "n": pl.Int64, "unit": pl.String,
              "shuffled_ci_low": pl.Float64, "shuffled_ci_high": pl.Float64}  # fmt: skip
    intervals = pl.DataFrame(records, schema=schema).select(PROBE_INTERVAL_COLUMNS)
    return pl.concat([probes.drop(PROBE_INTERVAL_COLUMNS, strict=False), intervals], how="horizontal")


def optimised_summary(
    table: pl.DataFrame,
    *,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pl.DataFrame:
    """Exact-recovery rate and mean BLEU (0–100) of optimised vectors, target sentences resampled."""
    rows = table.with_columns(exact=pl.col("exact_match").cast(pl.Float64), bleu=pl.col("bleu").cast(pl.Float64))
    options = {"unit": TARGET, "replicates": replicates, "confidence": confidence, "seed": seed}
    return pl.concat(
        [
            _long(summarise(rows, "exact", ["layer"], "target_id", **options), "exact", "exact_recovery", MEAN),
            _long(summarise(rows, "bleu", ["layer"], "target_id", **options), "bleu", "bleu", MEAN),
        ]
    )


def steering_summary(
    tables: Mapping[str, pl.DataFrame], *, replicates: int = DEFAULT_REPLICATES, seed: int = 0
) -> pl.DataFrame:
    """Every method's per-setting summary in one long table (:data:`SUMMARY_SCHEMA`), methods as given."""
    parts = []
    for method, table in tables.items():
        if method in GENERATION_METHODS:
            part = generation_summary(table, replicates=replicates, seed=seed)
        elif method == "iti":
            part = iti_summary(table, replicates=replicates, seed=seed)
        elif method == "optimised":
            part = optimised_summary(table, replicates=replicates, seed=seed)
        else:
            continue
        parts.append(part.with_columns(method=pl.lit(method)))
    if not parts:
        return pl.DataFrame(schema=SUMMARY_SCHEMA)
    return pl.concat([_aligned(part) for part in parts])


def _aligned(part: pl.DataFrame) -> pl.DataFrame:
    """A method's summary in :data:`SUMMARY_SCHEMA`'s columns (missing ones null)."""
    return part.select(
        pl.col(name).cast(dtype) if name in part.columns else pl.lit(None, dtype).alias(name)
        for name, dtype in SUMMARY_SCHEMA.items()
    )


def select(summary: pl.DataFrame, measure: str, statistic: str, **where: object) -> pl.DataFrame:
    """The summary rows of one measure and statistic (and equal to ``where``'s values), ordered by coefficient."""
    rows = summary.filter(pl.col("measure") == measure, pl.col("statistic") == statistic)
    for column, value in where.items():
        rows = rows.filter(pl.col(column) == value)
    return rows.sort("coefficient")
