"""Entry point of rule plot_geometry_models (rules/geometry.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.geometry import plot_models, plot_performance
from latent_atlas.provenance import read_tables

with job_log(snakemake.log[0]):
    geometry, readout = read_tables(snakemake.input.geometry), read_tables(snakemake.input.readout)
    performance, relations = read_tables(snakemake.input.performance), pl.read_parquet(snakemake.input.relations)
    title = snakemake.wildcards.corpus
    out = snakemake.output
    plot_models(geometry, readout, out.models_pdf, out.models_png, title)
    plot_performance(geometry, performance, relations, out.performance_pdf, out.performance_png, title)
