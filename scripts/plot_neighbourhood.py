"""Entry point of rule plot_neighbourhood (rules/neighbourhood.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.neighbourhood import plot_neighbourhood_map, plot_stability

with job_log(snakemake.log[0]):
    table = pl.read_parquet(snakemake.input.table)
    wildcards = snakemake.wildcards
    title = f"{wildcards.point} · {wildcards.model} · {wildcards.corpus}"
    plot_stability(table, snakemake.output.stability_pdf, snakemake.output.stability_png, title)
    plot_neighbourhood_map(table, snakemake.output.map_pdf, snakemake.output.map_png, title)
