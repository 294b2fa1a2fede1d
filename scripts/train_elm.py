"""Entry point of rule train_elm (rules/readers.smk)."""

from pathlib import Path

import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import write_parquet_with_provenance
from latent_atlas.readers.elm import save_adapter
from latent_atlas.readers.pipeline import elm_data, reader_provenance, train_elm
from latent_atlas.readers.settings import ElmSettings
from latent_atlas.store import ActivationStore

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    section = snakemake.params.settings  # as the rule gives it: what the provenance's config hash covers
    settings = ElmSettings.from_config(section)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    corpus, _ = load_corpus_table(snakemake.input.corpus)
    with ActivationStore(snakemake.input.store, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        data = elm_data(loaded.tokenizer, store, corpus, settings)
        meta = reader_provenance(loaded, snakemake.wildcards.model, section, store)
    adapter, losses = train_elm(loaded, data, settings)
    save_adapter(snakemake.output.adapter, adapter, loaded, meta)
    write_parquet_with_provenance(losses, snakemake.output.losses, meta)
