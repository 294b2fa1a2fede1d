"""Entry point of rule steer_heads (rules/steering.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import sha256_file, write_parquet_with_provenance
from latent_atlas.steering.data import SPLITS, load_statements, load_steering_data
from latent_atlas.steering.pipeline import run_iti, steering_provenance
from latent_atlas.store import ActivationStore

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    settings = snakemake.params.settings
    model_dir = Path(snakemake.input.manifest).parent
    loaded = load_model(model_dir, "auto", settings["model_dtype"], dtype_key="steering.model_dtype")
    data = load_steering_data(snakemake.input.data)
    iti = settings.get("iti", {})
    fractions = iti.get("train_fraction", 0.4), iti.get("validation_fraction", 0.2)
    statements = load_statements(snakemake.input.facts, *fractions, seed=settings.get("seed", 0))
    with ActivationStore(snakemake.input.store, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        table, probes = run_iti(loaded, statements, data, settings, store)
    meta = steering_provenance(
        loaded,
        snakemake.wildcards.model,
        settings,
        "iti",
        snakemake.input.data,
        snakemake.input.store,
        facts_sha256=sha256_file(snakemake.input.facts),
        split_items={name: int((statements.split == name).sum()) for name in SPLITS},
    )
    model = snakemake.wildcards.model
    write_parquet_with_provenance(table.with_columns(model=pl.lit(model)), snakemake.output.table, meta)
    write_parquet_with_provenance(probes.with_columns(model=pl.lit(model)), snakemake.output.probes, meta)
