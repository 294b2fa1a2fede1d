"""Entry point of rule plot_geometry_models (rules/figures.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.geometry import plot_models, plot_performance


def _concat(paths: list[str]) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(path) for path in paths], how="diagonal")


with job_log(snakemake.log[0]):
    geometry, readout = _concat(snakemake.input.geometry), _concat(snakemake.input.readout)
    performance, relations = _concat(snakemake.input.performance), pl.read_parquet(snakemake.input.relations)
    title = snakemake.wildcards.corpus
    out = snakemake.output
    plot_models(geometry, readout, out.models_pdf, out.models_png, title)
    plot_performance(geometry, performance, relations, out.performance_pdf, out.performance_png, title)
