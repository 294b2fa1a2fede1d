"""Entry point of rule decide_claims (rules/claims.smk)."""

from pathlib import Path

from latent_atlas.claims import gather
from latent_atlas.claims.report import claims_html
from latent_atlas.joblog import job_log
from latent_atlas.plots.claims import plot_claims
from latent_atlas.provenance import atomic_output, provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    model, corpus = snakemake.wildcards.model, snakemake.wildcards.corpus
    paths = {key: path for key, path in snakemake.input.items()}
    table = gather(paths, snakemake.params.settings, model, corpus)
    meta = provenance_record(snakemake.params.settings, model=model, corpus=corpus, inputs=sorted(paths.values()))
    write_parquet_with_provenance(table, snakemake.output.table, meta)
    with atomic_output(snakemake.output.page) as tmp:
        Path(tmp).write_text(claims_html(table, f"Claims: {model} on {corpus}"))
    outputs = snakemake.output
    plot_claims(table, outputs.claims_pdf, outputs.claims_png, f"{model} · {corpus}")
