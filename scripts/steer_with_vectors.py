"""Entry point of rule steer_with_vectors (rules/steering.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import write_parquet_with_provenance
from latent_atlas.steering.data import load_steering_data
from latent_atlas.steering.generate import StateCapture, capture_layers, write_states
from latent_atlas.steering.pipeline import steering_provenance, sweep
from latent_atlas.steering.vectors import prefix_tokens
from latent_atlas.store import ActivationStore

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    settings, method = snakemake.params.settings, snakemake.wildcards.method
    model_dir = Path(snakemake.input.manifest).parent
    loaded = load_model(model_dir, "auto", settings["model_dtype"], dtype_key="steering.model_dtype")
    data = load_steering_data(snakemake.input.data)
    with ActivationStore(snakemake.input.store, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        capture = StateCapture(capture_layers(settings), context={"method": method})
        table = sweep(loaded, method, data, settings, store, capture)
    prefix = prefix_tokens(loaded.tokenizer, settings.get("prefix", "auto"))  # steering.prefix, resolved
    extra = {"prefix": loaded.tokenizer.decode(prefix), "prefix_ids": prefix}
    meta = steering_provenance(
        loaded, snakemake.wildcards.model, settings, method, snakemake.input.data, snakemake.input.store, **extra
    )
    write_parquet_with_provenance(
        table.with_columns(model=pl.lit(snakemake.wildcards.model)), snakemake.output.table, meta
    )
    write_states(snakemake.output.states, capture, meta)  # the generated tokens' residual states
