"""Entry point of rule extract_activations (rules/activations.smk)."""

from pathlib import Path

import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    settings = ExtractionSettings.for_model(snakemake.params.settings, snakemake.params.model)
    model_dir = Path(snakemake.input.manifest).parent
    loaded = load_model(model_dir, settings.device, settings.model_dtype, "extraction.device", "extraction.model_dtype")
    corpus, corpus_meta = load_corpus_table(snakemake.input.corpus)
    attrs = {**snakemake.params.provenance, "corpus_sha256": corpus_meta["corpus_sha256"]}
    path = extract_activations(loaded, corpus, snakemake.output.store, settings, attrs)
    log.info("wrote %s on %s in %s", path, loaded.device, loaded.dtype)
