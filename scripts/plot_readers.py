"""Entry point of rule plot_readers (rules/readers.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.plots.readers import plot_clustering, plot_descriptions, plot_elm, plot_paths
from latent_atlas.provenance import read_tables

with job_log(snakemake.log[0]):
    inputs, outputs, title = snakemake.input, snakemake.output, snakemake.wildcards.model
    if inputs.clustering:
        plot_clustering(read_tables(inputs.clustering), outputs.clustering_pdf, outputs.clustering_png, title)
    if hasattr(inputs, "evaluation"):
        evaluation = pl.read_parquet(inputs.evaluation)
        plot_elm(pl.read_parquet(inputs.losses), evaluation, outputs.elm_pdf, outputs.elm_png, title)
        examples = snakemake.params.examples
        plot_descriptions(evaluation, examples, outputs.descriptions_pdf, outputs.descriptions_png, title)
        plot_paths(pl.read_parquet(inputs.paths), outputs.paths_pdf, outputs.paths_png, title)
