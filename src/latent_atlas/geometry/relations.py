"""Which qualities of the space go with performance? Correlations across models and registers (RQ3).

Geometry metrics are averaged over the layers of each band of relative depth (early, middle, late), so that
models of different depth are compared at matching depth. A point is one (model, register) pair: geometry of
that register's held-out tokens against that model's bits-per-byte on the same register. With two models
and eight registers that is sixteen points from two models: the table says so in every row (``n`` and
``n_models``), pooled correlations are repeated within each model (where differences between the models
cannot drive them), and model-level correlations are left empty below three models rather than reported
as ±1. Spearman's ρ carries a 95 % percentile bootstrap over the points (``ci_low``, ``ci_high``, ``n``,
``unit``): with eight registers of one model that interval is wide, and below three points it is NaN.
"""

from collections.abc import Sequence

import numpy as np
import polars as pl

from latent_atlas.geometry.metrics import rank_average
from latent_atlas.stats import percentile_interval

BANDS: tuple[tuple[str, float, float], ...] = (("early", 0.0, 1 / 3), ("middle", 1 / 3, 2 / 3), ("late", 2 / 3, 1.0))
PERFORMANCE_MEASURES = ("bits_per_byte", "perplexity")
MIN_POINTS = 3
REPLICATES = 1000


def depth_band(relative_depth: float) -> str:
    """The band a relative depth (layer / L, in [0, 1]) falls in; layer 0 counts as early."""
    if not 0.0 <= relative_depth <= 1.0:
        raise ValueError(f"relative depth {relative_depth} is outside [0, 1]")
    return next(name for name, _, high in BANDS if relative_depth <= high)


def band_means(metrics: pl.DataFrame) -> pl.DataFrame:
    """Mean of each metric over the layers of each depth band, per model, register and processing."""
    return (
        metrics.with_columns(band=pl.col("relative_depth").map_elements(depth_band, return_dtype=pl.String))
        .group_by("model", "register", "processing", "metric", "band")
        .agg(pl.col("value").mean(), pl.col("layer").n_unique().alias("layers"))
    )


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN for fewer than three points or a constant variable."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < MIN_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ (Pearson's r of average ranks)."""
    return pearson(rank_average(np.asarray(x)), rank_average(np.asarray(y))) if len(x) >= MIN_POINTS else float("nan")


def _performance_long(performance: pl.DataFrame, benchmarks: pl.DataFrame | None) -> pl.DataFrame:
    """Performance as (model, register, measure, score); benchmark scores are model-level ('all')."""
    long = performance.unpivot(
        on=list(PERFORMANCE_MEASURES), index=["model", "register"], variable_name="measure", value_name="score"
    )
    if benchmarks is None or benchmarks.is_empty():
        return long
    extra = benchmarks.select(
        "model", pl.lit("all").alias("register"), pl.col("benchmark").alias("measure"), pl.col("score").cast(pl.Float64)
    )
    return pl.concat([long, extra])


def relate(geometry: pl.DataFrame, performance: pl.DataFrame, benchmarks: pl.DataFrame | None = None) -> pl.DataFrame:
    """Correlate every (metric, processing, band) with every performance measure.

    Levels: ``registers`` (points = model × register, pooled over models), ``registers within <model>``
    (one model's registers: differences between models cannot drive these), and ``models`` (points = models,
    register 'all'). Columns: level, model, processing, metric, band, measure, n, n_models, spearman,
    pearson (NaN below three points), ci_low, ci_high (of Spearman's ρ, over points), unit.
    """
    bands = band_means(geometry)
    scores = _performance_long(performance, benchmarks)
    joined = bands.join(scores, on=["model", "register"], how="inner")
    per_register = joined.filter(pl.col("register") != "all")
    groups = [
        ("registers", "all", per_register),
        *((f"registers within {model}", model, part) for (model,), part in per_register.group_by("model")),
        ("models", "all", joined.filter(pl.col("register") == "all")),
    ]
    rows = [
        _correlation_row(level, model, key, group)
        for level, model, table in groups
        for key, group in table.group_by("processing", "metric", "band", "measure", maintain_order=True)
    ]
    return pl.DataFrame(rows).sort("level", "measure", "processing", "metric", "band")


def _correlation_row(level: str, model: str, key: tuple[object, ...], group: pl.DataFrame) -> dict[str, object]:
    """One row of the relations table: the correlation over the finite points of a group.

    Points are taken in (model, register) order, so that the bootstrap's draws, and with them the interval, do not
    depend on the order in which the tables were grouped (polars' ``group_by`` order is not stable between runs).
    """
    group = group.sort("model", "register")
    x, y = group["value"].to_numpy(), group["score"].to_numpy()
    finite = np.isfinite(x) & np.isfinite(y)
    processing, metric, band, measure = key
    return {
        "level": level,
        "model": model,
        "processing": processing,
        "metric": metric,
        "band": band,
        "measure": measure,
        "n": int(finite.sum()),
        "n_models": group.filter(pl.Series(finite))["model"].n_unique(),
        "spearman": spearman(x[finite], y[finite]),
        "pearson": pearson(x[finite], y[finite]),
        **dict(zip(("ci_low", "ci_high"), spearman_interval(x[finite], y[finite]), strict=True)),
        "unit": "model"
        if level == "models"
        else "register"
        if level.startswith("registers within")
        else "model × register",
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties shared) along the last axis of ``(replicates, n)``."""
    less = (values[..., None, :] < values[..., :, None]).sum(-1)
    equal = (values[..., None, :] == values[..., :, None]).sum(-1)
    return less + (equal + 1) / 2


def spearman_interval(
    x: np.ndarray, y: np.ndarray, replicates: int = REPLICATES, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of Spearman's ρ over points resampled with replacement (NaN below three points).

    Replicates whose x or y is constant (a ρ that is not defined) are dropped; NaN when none is left.
    """
    n = len(x)
    if n < MIN_POINTS:
        return float("nan"), float("nan")
    index = np.random.default_rng(seed).integers(0, n, (replicates, n))
    rx, ry = _ranks(np.asarray(x, np.float64)[index]), _ranks(np.asarray(y, np.float64)[index])
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    scale = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    rho = (rx * ry).sum(1) / np.where(scale > 0, scale, np.nan)
    interval = percentile_interval(float("nan"), rho, n=n, unit="point", confidence=confidence)
    return interval.low, interval.high


def read_benchmarks(path: str | None, models: Sequence[str]) -> pl.DataFrame | None:
    """User-supplied benchmark scores (CSV: model, benchmark, score), restricted to the configured models."""
    if not path:
        return None
    table = pl.read_csv(path)
    missing = {"model", "benchmark", "score"} - set(table.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}; it needs model, benchmark, score")
    return table.filter(pl.col("model").is_in(list(models)))
