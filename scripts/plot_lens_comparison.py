"""Entry point of rule plot_lens_comparison (rules/lenses.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.lenses import plot_lens_agreement, plot_lens_comparison

with job_log(snakemake.log[0]):
    table = pl.read_parquet(snakemake.input.table)
    title = f"{snakemake.wildcards.model} · {snakemake.wildcards.corpus}"
    plot_lens_comparison(table, snakemake.output.curves_pdf, snakemake.output.curves_png, title)
    plot_lens_agreement(table, snakemake.output.agreement_pdf, snakemake.output.agreement_png, title)
