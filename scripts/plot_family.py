"""Entry point of rule plot_family (rules/training.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.training import (
    plot_family_geometry,
    plot_family_lenses,
    plot_family_performance,
    plot_family_relations,
    plot_training_curves,
)

with job_log(snakemake.log[0]):
    inputs, out = snakemake.input, snakemake.output
    performance, geometry = pl.read_parquet(inputs.performance), pl.read_parquet(inputs.geometry)
    title = f"training family {snakemake.params.family}"
    plot_family_performance(performance, out.performance_pdf, out.performance_png, title)
    plot_training_curves(pl.read_parquet(inputs.losses), out.curves_pdf, out.curves_png, title)
    plot_family_geometry(geometry, out.geometry_pdf, out.geometry_png, title)
    plot_family_lenses(pl.read_parquet(inputs.lenses), out.lenses_pdf, out.lenses_png, title)
    relations = pl.read_parquet(inputs.relations)
    plot_family_relations(geometry, performance, relations, out.relations_pdf, out.relations_png, title)
