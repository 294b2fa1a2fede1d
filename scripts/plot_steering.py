"""Entry point of rule plot_steering (rules/steering.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.names import GENERATION_METHODS
from latent_atlas.plots.steering import plot_effect, plot_examples, plot_frontier, plot_iti

with job_log(snakemake.log[0]):
    tables = {name: pl.read_parquet(path) for name, path in snakemake.input.items()}
    summary = tables.get("summary")  # results/steering/{model}/summary.parquet: the intervals drawn
    generation = [tables[m] for m in GENERATION_METHODS if m in tables]
    combined = pl.concat(generation, how="diagonal") if generation else None
    title = snakemake.wildcards.model
    outputs = snakemake.output
    if combined is not None:
        plot_effect(combined, outputs.effect_pdf, outputs.effect_png, title, summary)
        plot_frontier(combined, outputs.frontier_pdf, outputs.frontier_png, title, summary)
    if "iti" in tables:
        plot_iti(tables["iti"], tables["iti_probes"], outputs.iti_pdf, outputs.iti_png, title, summary)
    plot_examples(combined, tables.get("optimised"), outputs.examples_pdf, outputs.examples_png, title)
