"""Entry point of rule relate_geometry (rules/geometry.smk)."""

from latent_atlas.geometry.relations import read_benchmarks, relate
from latent_atlas.joblog import job_log
from latent_atlas.provenance import provenance_record, read_tables, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    geometry, performance = read_tables(snakemake.input.geometry), read_tables(snakemake.input.performance)
    models = performance["model"].unique().to_list()
    benchmarks = read_benchmarks(snakemake.input.get("benchmarks"), models)
    table = relate(geometry, performance, benchmarks)
    meta = provenance_record(
        {"models": sorted(models), "corpus": snakemake.wildcards.corpus},
        geometry=list(snakemake.input.geometry),
        performance=list(snakemake.input.performance),
    )
    write_parquet_with_provenance(table, snakemake.output.table, meta)
