"""Entry point of rule plot_geometry (rules/geometry.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.geometry import plot_processing, plot_registers, plot_rogue

with job_log(snakemake.log[0]):
    metrics, rogue = pl.read_parquet(snakemake.input.metrics), pl.read_parquet(snakemake.input.rogue)
    title = f"{snakemake.wildcards.model} · {snakemake.wildcards.corpus}"
    out = snakemake.output
    plot_processing(metrics, out.processing_pdf, out.processing_png, title)
    plot_rogue(rogue, out.rogue_pdf, out.rogue_png, title, metrics)
    plot_registers(metrics, out.registers_pdf, out.registers_png, title)
