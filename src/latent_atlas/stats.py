"""Uncertainty: the one seeded bootstrap every comparison in latent-atlas calls.

A comparison is only as good as its interval, and an interval is only as good as the unit it resamples. Each
caller names the unit that is independent in its design (a prompt for steering, a document for perplexity and
lens curves, a test item or a seed for readers, a statement for ITI) and passes one row per observation with
that unit's id; rows that share an id are resampled together (a cluster bootstrap), so several samples of one
prompt or several tokens of one document never count as independent evidence. Paired comparisons (steered vs
unsteered on the same prompt, own vs shuffled embedding on the same passage) are differences computed within
each unit before resampling, so every replicate keeps each pair together.

The interval is the percentile interval of ``replicates`` resamples, seeded: the same inputs and seed give the
same interval on every machine. With fewer than ``MIN_UNITS`` units the interval is NaN (a bootstrap of one or
two units says nothing). Tables carry the result as ``estimate`` (or the caller's column), ``ci_low``,
``ci_high``, ``n`` (units, not rows) and ``unit``.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

MIN_UNITS = 3
DEFAULT_REPLICATES = 1000
DEFAULT_CONFIDENCE = 0.95
INTERVAL_SCHEMA = {"ci_low": pl.Float64, "ci_high": pl.Float64, "n": pl.Int64, "unit": pl.String}
INTERVAL_COLUMNS = tuple(INTERVAL_SCHEMA)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval over ``n`` units of kind ``unit``."""

    estimate: float
    low: float
    high: float
    n: int
    unit: str

    def columns(self) -> dict[str, float | int | str]:
        """The interval as a table's columns: ``ci_low``, ``ci_high``, ``n``, ``unit``."""
        return {"ci_low": self.low, "ci_high": self.high, "n": self.n, "unit": self.unit}

    def excludes(self, value: float) -> bool:
        """Whether the whole interval lies on one side of ``value`` (NaN intervals exclude nothing)."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and (self.low > value or self.high < value))


def _check(replicates: int, confidence: float) -> None:
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be a positive integer, got {replicates!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def _cluster_sums(values: np.ndarray, units: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit sums and row counts of ``values`` (each row its own unit when ``units`` is None)."""
    if units is None:
        return values, np.ones(len(values))
    _, inverse = np.unique(np.asarray(units), return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(np.float64)
    return sums, counts


def percentile_interval(
    estimate: float, draws: Sequence[float] | np.ndarray, *, n: int, unit: str, confidence: float = DEFAULT_CONFIDENCE
) -> Interval:
    """``estimate`` with the percentile interval of its bootstrap ``draws`` over ``n`` units of kind ``unit``.

    The one place an interval is read off replicates: the ``(1 − confidence)/2`` and ``(1 + confidence)/2``
    quantiles of the finite draws (non-finite ones, such as a replicate whose statistic is undefined, are
    dropped). NaN bounds when ``n < MIN_UNITS`` or fewer than ``MIN_UNITS`` finite draws are left. For callers
    that compute their own replicates (a maximum over layers, a vectorised correlation, pair-weighted means);
    :func:`bootstrap_mean` and :func:`bootstrap_statistic` end here too.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    draws = np.asarray(draws, dtype=np.float64).ravel()
    draws = draws[np.isfinite(draws)]
    if n < MIN_UNITS or len(draws) < MIN_UNITS:
        return Interval(float(estimate), float("nan"), float("nan"), n, unit)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high), n, unit)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    units: Sequence[object] | np.ndarray | None = None,
    *,
    unit: str,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` with a percentile interval that resamples whole units.

    ``units`` gives each row's unit id (rows of one id are drawn together; None: every row is a unit). The
    estimate is the mean over rows, each replicate the mean over the rows of the drawn units (a ratio of sums,
    so units with more rows weigh more, as in the estimate). NaN rows are dropped first.
    """
    _check(replicates, confidence)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    ids = None if units is None else np.asarray(units)[keep]
    values = values[keep]
    if len(values) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, unit)
    sums, counts = _cluster_sums(values, ids)
    n = len(sums)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
    replicate_means = (draws @ sums) / (draws @ counts)
    return percentile_interval(float(values.mean()), replicate_means, n=n, unit=unit, confidence=confidence)


def bootstrap_statistic(
    rows: pl.DataFrame,
    statistic: Callable[[pl.DataFrame], float],
    unit_column: str,
    *,
    unit: str,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Any scalar ``statistic`` of a table, with a percentile interval that resamples whole units.

    Each replicate draws as many units as there are, with replacement, and hands ``statistic`` the table of
    their rows (a unit drawn twice appears twice, under a fresh id in ``unit_column`` so that statistics which
    group by unit still see two units). For a correlation, an accuracy over items or a ratio of means.
    """
    _check(replicates, confidence)
    if unit_column not in rows.columns:
        raise ValueError(f"bootstrap_statistic: no column {unit_column!r} (have {rows.columns})")
    ids = rows[unit_column].unique(maintain_order=True)
    n = len(ids)
    estimate = float(statistic(rows))
    if n < MIN_UNITS:
        return Interval(estimate, float("nan"), float("nan"), n, unit)
    groups = rows.with_columns(pl.col(unit_column).rank("dense").cast(pl.Int64).alias("__unit") - 1)
    positions = [np.flatnonzero(groups["__unit"].to_numpy() == k) for k in range(n)]
    rng = np.random.default_rng(seed)
    draws = np.empty(replicates)
    for replicate in range(replicates):
        chosen = rng.integers(0, n, n)
        index = np.concatenate([positions[k] for k in chosen])
        fresh = np.repeat(np.arange(n), [len(positions[k]) for k in chosen])
        sample = rows[index].with_columns(pl.Series(unit_column, fresh))
        draws[replicate] = statistic(sample)
    return percentile_interval(estimate, draws, n=n, unit=unit, confidence=confidence)


def paired_differences(
    rows: pl.DataFrame, value: str, condition: str, treated: object, baseline: object, pair_on: Sequence[str]
) -> pl.DataFrame:
    """``treated − baseline`` of ``value`` within each pair (rows matched on the ``pair_on`` columns).

    Raises when a treated row has no baseline partner (an unpaired design must not pass as a paired one).
    """
    keys = list(pair_on)
    left = rows.filter(pl.col(condition) == treated).select([*keys, pl.col(value).alias("__treated")])
    right = rows.filter(pl.col(condition) == baseline).select([*keys, pl.col(value).alias("__baseline")])
    for side, name in ((left, treated), (right, baseline)):
        if side.select(keys).is_duplicated().any():
            raise ValueError(f"paired_differences: several rows of {condition}={name!r} share one pair {keys}")
    joined = left.join(right, on=keys, how="left")
    if joined["__baseline"].null_count():
        missing = f"rows of {condition}={treated!r} without a {baseline!r} partner on {keys}"
        raise ValueError(f"paired_differences: {missing}")
    return joined.select([*keys, (pl.col("__treated") - pl.col("__baseline")).alias(value)])


def _groups(rows: pl.DataFrame, by: Sequence[str]) -> list[tuple[tuple[object, ...], pl.DataFrame]]:
    """The table's groups by ``by`` in order of appearance (the whole table when ``by`` is empty)."""
    if not by:
        return [((), rows)]
    return list(rows.group_by(list(by), maintain_order=True))


def summarise(
    rows: pl.DataFrame,
    value: str,
    by: Sequence[str],
    unit_column: str,
    *,
    unit: str,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pl.DataFrame:
    """One row per group of ``by``: the mean of ``value`` and its unit-resampled interval.

    Columns: ``by``, ``value`` (the mean), ``ci_low``, ``ci_high``, ``n`` (units) and ``unit``. Each group is
    resampled with the same seed, so groups measured on the same units draw the same units (their intervals
    move together, as a paired design's should).
    """
    records = []
    for key, group in _groups(rows, by):
        interval = bootstrap_mean(
            group[value].to_numpy(), group[unit_column].to_numpy(), unit=unit,
            replicates=replicates, confidence=confidence, seed=seed,
        )  # fmt: skip
        records.append({**dict(zip(by, key, strict=True)), value: interval.estimate, **interval.columns()})
    schema = {**{name: rows.schema[name] for name in by}, value: pl.Float64, **INTERVAL_SCHEMA}
    return pl.DataFrame(records, schema=schema)


def summarise_paired(
    rows: pl.DataFrame,
    value: str,
    condition: str,
    baseline: object,
    by: Sequence[str],
    unit_column: str,
    pair_on: Sequence[str],
    *,
    unit: str,
    replicates: int = DEFAULT_REPLICATES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pl.DataFrame:
    """Per group of ``by`` and per treated ``condition``: the mean paired difference from ``baseline``.

    ``pair_on`` names what makes a pair (for steering: prompt, sample, decoding); ``unit_column`` (a member of
    ``pair_on``) what is resampled. Columns: ``by``, ``condition``, ``value`` (mean treated − baseline),
    ``ci_low``, ``ci_high``, ``n``, ``unit``.
    """
    records = []
    for key, group in _groups(rows, by):
        for treated in group[condition].unique(maintain_order=True).to_list():
            if treated == baseline:
                continue
            differences = paired_differences(group, value, condition, treated, baseline, pair_on)
            interval = bootstrap_mean(
                differences[value].to_numpy(), differences[unit_column].to_numpy(), unit=unit,
                replicates=replicates, confidence=confidence, seed=seed,
            )  # fmt: skip
            records.append(
                {**dict(zip(by, key, strict=True)), condition: treated, value: interval.estimate, **interval.columns()}
            )
    schema = {**{name: rows.schema[name] for name in by}, condition: rows.schema[condition], value: pl.Float64}
    schema |= INTERVAL_SCHEMA
    return pl.DataFrame(records, schema=schema)
