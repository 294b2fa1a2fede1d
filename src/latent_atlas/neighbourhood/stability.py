"""A point's stability curves: each metric's mean over sampled directions, with a bootstrap over directions.

Torch-free, so the figure job that draws the curves (``plot_neighbourhood``) does not import the model stack.
"""

from collections.abc import Sequence

import polars as pl

from latent_atlas.stats import DEFAULT_REPLICATES, summarise

STABILITY_METRICS = ("top1_retained", "jaccard_topk", "kl_to_reference", "nn_distance")
DIRECTION_UNIT = "direction"


def stability_summary(
    table: pl.DataFrame,
    metrics: Sequence[str] = STABILITY_METRICS,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> pl.DataFrame:
    """Each stability metric's mean over sampled directions, with its 95 % percentile bootstrap over directions.

    One row per (layer, decoder, family, radius, metric) of a point's ``sample`` rows: ``value`` (the mean over
    directions), ``ci_low``, ``ci_high``, ``n`` (directions) and ``unit`` (``'direction'``). A direction is a
    ``sample`` index within its (layer, family): the same direction is evaluated at every radius, so it is the
    independent unit, and every group is resampled with the same seed so the curves of one family draw the
    same directions at every radius (their bands move together, as a paired design's should). The model
    decoder reads only the first ``model_samples`` directions, so its ``n`` is smaller. Metrics the table
    lacks are left out.
    """
    keys = ["layer", "decoder", "family", "radius"]
    samples = table.filter(pl.col("kind") == "sample")
    if samples.select([*keys, "sample"]).is_duplicated().any():
        raise ValueError("stability_summary: several rows per (layer, decoder, family, radius, sample)")
    present = [metric for metric in metrics if metric in samples.columns]
    rows = samples.select([*keys, "sample", *present]).unpivot(
        index=[*keys, "sample"], on=present, variable_name="metric", value_name="value"
    )
    rows = rows.with_columns(pl.col("value").cast(pl.Float64))
    return summarise(rows, "value", [*keys, "metric"], "sample", unit=DIRECTION_UNIT, replicates=replicates, seed=seed)
