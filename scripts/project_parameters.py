"""Entry point of rule project_parameters (rules/lenses.smk)."""

from pathlib import Path

import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import project_parameters
from latent_atlas.lenses.projections import recall_texts
from latent_atlas.models import load_model
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    settings = snakemake.params.settings
    loaded = load_model(Path(snakemake.input.manifest).parent, device="cpu")
    corpus, corpus_meta = load_corpus_table(snakemake.input.corpus)
    texts = recall_texts(corpus, settings.get("recall_split", "heldout"), settings.get("seed", 0))
    tables = project_parameters(loaded, settings, texts)
    meta = provenance_record(
        dict(settings),
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        corpus=snakemake.input.corpus,
        corpus_sha256=corpus_meta["corpus_sha256"],
    )
    for name, table in tables.items():
        write_parquet_with_provenance(table, snakemake.output[name], meta)
