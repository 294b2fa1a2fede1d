"""Entry point of rule extract_shard (rules/activations.smk): one shard of a sharded extraction."""

from pathlib import Path

import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.extract import ExtractionSettings
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.shards import extract_shard

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    settings = ExtractionSettings.for_model(snakemake.params.settings, snakemake.params.model)
    model_dir = Path(snakemake.input.manifest).parent
    loaded = load_model(model_dir, settings.device, settings.model_dtype, "extraction.device", "extraction.model_dtype")
    corpus, corpus_meta = load_corpus_table(snakemake.input.corpus)
    attrs = {**snakemake.params.provenance, "corpus_sha256": corpus_meta["corpus_sha256"]}
    shard, shards = int(snakemake.wildcards.shard), int(snakemake.params.shards)
    path = extract_shard(loaded, corpus, snakemake.output.store, settings, attrs, shard, shards)
    log.info("wrote shard %d of %d to %s on %s in %s", shard, shards, path, loaded.device, loaded.dtype)
