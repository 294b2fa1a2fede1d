"""Entry point of rule plot_projection_recall (rules/lenses.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.projections import plot_projection_recall

with job_log(snakemake.log[0]):
    table = pl.read_parquet(snakemake.input.recall)
    plot_projection_recall(table, snakemake.output.recall_pdf, snakemake.output.recall_png, snakemake.wildcards.model)
