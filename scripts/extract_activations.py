"""Entry point of rule extract_activations (rules/activations.smk)."""

from pathlib import Path

import torch

from latent_atlas.extract import extract_activations, start_extraction_job
from latent_atlas.joblog import job_log

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    job = start_extraction_job(
        params.settings, params.model, Path(snakemake.input.manifest).parent, snakemake.input.corpus, params.provenance
    )
    path = extract_activations(job.loaded, job.corpus, snakemake.output.store, job.settings, job.attrs)
    log.info("wrote %s on %s in %s", path, job.loaded.device, job.loaded.dtype)
