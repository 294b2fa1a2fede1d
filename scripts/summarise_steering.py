"""Entry point of rule summarise_steering (rules/steering.smk)."""

import polars as pl

from latent_atlas.joblog import job_log
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance
from latent_atlas.steering.summary import steering_summary

with job_log(snakemake.log[0]):
    tables = {method: pl.read_parquet(path) for method, path in snakemake.input.items()}
    summary = steering_summary(tables, seed=snakemake.params.seed)
    meta = provenance_record(
        {"seed": snakemake.params.seed}, model=snakemake.wildcards.model, inputs=dict(snakemake.input)
    )
    write_parquet_with_provenance(
        summary.with_columns(model=pl.lit(snakemake.wildcards.model)), snakemake.output.summary, meta
    )
