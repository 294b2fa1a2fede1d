"""Entry point of rule measure_geometry (rules/geometry.smk)."""

from pathlib import Path

import polars as pl
import torch
from transformers import AutoTokenizer

from latent_atlas.geometry.measure import GeometrySettings, measure_geometry
from latent_atlas.joblog import job_log
from latent_atlas.models import read_manifest
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance
from latent_atlas.store import ActivationStore

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    model_dir = Path(snakemake.input.manifest).parent
    manifest = read_manifest(model_dir)
    settings = GeometrySettings.from_config(snakemake.params.settings)
    with ActivationStore(snakemake.input.store, expect={"model_sha256": manifest["weights_sha256"]}) as store:
        result = measure_geometry(store, AutoTokenizer.from_pretrained(model_dir), settings)
        store_hash = store.attrs["config_hash"]
    meta = provenance_record(
        {"geometry": snakemake.params.settings},
        model=snakemake.wildcards.model,
        model_sha256=manifest["weights_sha256"],
        store=snakemake.input.store,
        store_config_hash=store_hash,
    )
    tag = {"model": pl.lit(snakemake.wildcards.model), "corpus": pl.lit(snakemake.wildcards.corpus)}
    tables = {"metrics": result.metrics, "rogue": result.rogue, "flow": result.flow_losses, "massive": result.massive}
    for name, table in tables.items():
        write_parquet_with_provenance(table.with_columns(**tag), snakemake.output[name], meta)
