"""Entry point of rule extract_shard (rules/activations.smk): one shard of a sharded extraction."""

from pathlib import Path

import torch

from latent_atlas.extract import start_extraction_job
from latent_atlas.joblog import job_log
from latent_atlas.shards import extract_shard

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    job = start_extraction_job(
        params.settings, params.model, Path(snakemake.input.manifest).parent, snakemake.input.corpus, params.provenance
    )
    shard, shards = int(snakemake.wildcards.shard), int(params.shards)
    path = extract_shard(job.loaded, job.corpus, snakemake.output.store, job.settings, job.attrs, shard, shards)
    log.info("wrote shard %d of %d to %s on %s in %s", shard, shards, path, job.loaded.device, job.loaded.dtype)
