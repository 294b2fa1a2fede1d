"""Entry point of rule optimise_steering_vectors (rules/steering.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import write_parquet_with_provenance
from latent_atlas.steering.data import load_steering_data
from latent_atlas.steering.pipeline import run_optimised, steering_provenance
from latent_atlas.steering.vectors import prefix_tokens, start_token
from latent_atlas.store import ActivationStore

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    # float32 whatever steering.model_dtype says: the vectors are optimised by gradient (see run_optimised)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto", dtype="float32")
    settings = snakemake.params.settings
    data = load_steering_data(snakemake.input.data)
    with ActivationStore(snakemake.input.store, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        table = run_optimised(loaded, data, settings, store)
    prefix = prefix_tokens(loaded.tokenizer, settings["optimised"].get("prefix", "auto"), "steering.optimised.prefix")
    meta = steering_provenance(
        loaded,
        snakemake.wildcards.model,
        settings,
        "optimised",
        snakemake.input.data,
        snakemake.input.store,
        optimised_prefix=loaded.tokenizer.decode(prefix),
        optimised_prefix_ids=prefix,
        optimised_start=loaded.tokenizer.decode([start_token(loaded.tokenizer, prefix)]),
    )
    write_parquet_with_provenance(
        table.with_columns(model=pl.lit(snakemake.wildcards.model)), snakemake.output.table, meta
    )
