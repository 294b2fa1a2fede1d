"""Entry point of rule plot_store_norms (rules/activations.smk)."""

from latent_atlas.joblog import job_log
from latent_atlas.plots.store import plot_layer_norms
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance
from latent_atlas.summaries import layer_norms

with job_log(snakemake.log[0]):
    table = layer_norms(snakemake.input.store)
    write_parquet_with_provenance(table, snakemake.output.table, provenance_record({}, store=snakemake.input.store))
    title = f"{snakemake.wildcards.model} · {snakemake.wildcards.corpus}"
    plot_layer_norms(table, snakemake.output.norms_pdf, snakemake.output.norms_png, title=title)
