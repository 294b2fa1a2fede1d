"""Entry point of rule evaluate_lenses (rules/lenses.smk)."""

from pathlib import Path

import torch

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import evaluate_lenses_with_documents
from latent_atlas.models import load_model
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="cpu")
    settings = snakemake.params.settings
    table, documents = evaluate_lenses_with_documents(loaded, snakemake.input.store, snakemake.input.tuned, settings)
    meta = provenance_record(dict(settings), store=snakemake.input.store, tuned=snakemake.input.tuned)
    write_parquet_with_provenance(table, snakemake.output.table, meta)
    write_parquet_with_provenance(documents, snakemake.output.documents, meta)
