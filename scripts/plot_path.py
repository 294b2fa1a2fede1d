"""Entry point of rule plot_path (rules/neighbourhood.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.neighbourhood import plot_path_strip

with job_log(snakemake.log[0]):
    table = pl.read_parquet(snakemake.input.table)
    wildcards = snakemake.wildcards
    title = f"{wildcards.path} · {wildcards.model} · {wildcards.corpus}"
    plot_path_strip(table, snakemake.output.path_pdf, snakemake.output.path_png, title)
