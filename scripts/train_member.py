"""Entry point of rule train_member (rules/training.smk)."""

from pathlib import Path

import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.joblog import job_log
from latent_atlas.training.loop import parse_recipe
from latent_atlas.training.member import train_member

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    spec = snakemake.params.spec
    _, corpus_meta = load_corpus_table(snakemake.input.corpus)
    manifest = train_member(
        spec,
        parse_recipe(snakemake.params.training),
        snakemake.input.tokenizer,
        snakemake.input.tokens,
        corpus_meta["corpus_sha256"],
        Path(snakemake.output.manifest).parent,
        snakemake.output.losses,
        snakemake.params.checkpoints,
        device=snakemake.params.device,
    )
    record = manifest["training"]
    log.info(
        "%s: %d tokens seen, final validation loss %.4f (resumed from step %s)",
        spec["name"],
        record["tokens_seen"],
        record["final_validation_loss"],
        record["resumed_from_step"],
    )
