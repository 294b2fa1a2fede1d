"""Entry point of rule compare_readers (rules/readers.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import write_parquet_with_provenance
from latent_atlas.readers.pipeline import compare_readers, reader_provenance
from latent_atlas.readers.settings import ComparisonSettings
from latent_atlas.store import ActivationStore

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    corpus, _ = load_corpus_table(snakemake.input.corpus)
    params = snakemake.params
    task, clustering, lora, max_tokens = params.task, params.settings, params.lora, params.max_tokens
    settings = ComparisonSettings.from_config(
        snakemake.wildcards.task, task=task, clustering=clustering, lora=lora, max_tokens=max_tokens
    )
    with ActivationStore(snakemake.input.store, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        table = compare_readers(loaded, store, corpus, settings)
        meta = reader_provenance(
            loaded,
            snakemake.wildcards.model,
            {"task": task, "clustering": clustering, "lora": lora, "max_tokens": max_tokens},
            store,
        )
    write_parquet_with_provenance(
        table.with_columns(model=pl.lit(snakemake.wildcards.model)), snakemake.output.table, meta
    )
