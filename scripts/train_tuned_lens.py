"""Entry point of rule train_tuned_lens (rules/lenses.smk)."""

from pathlib import Path

import torch

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import train_tuned_lens_on_store
from latent_atlas.models import load_model

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="cpu")
    train_tuned_lens_on_store(
        loaded,
        snakemake.input.store,
        snakemake.output.lens,
        snakemake.params.settings,
        on_step=lambda step, loss: log.info("step %d mean KL over layers %.4f", step, loss),
    )
