"""Entry point of rule evaluate_on_training_corpus (rules/training.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.evaluation import context_token
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance
from latent_atlas.training.evaluate import evaluate_documents, scored_documents

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    settings = snakemake.params.settings
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    corpus, corpus_meta = load_corpus_table(snakemake.input.corpus)
    documents = scored_documents(
        corpus, snakemake.params.registers, settings["split"], settings["max_documents_per_register"]
    )
    table, per_document = evaluate_documents(loaded, documents, settings["split"], settings["max_length"])
    overall = table.filter(pl.col("register") == "all")
    log.info(
        "%s: %.3f bits/byte over %d documents", snakemake.wildcards.model, overall["bits_per_byte"][0], documents.height
    )
    meta = provenance_record(
        {"evaluation": settings, "registers": snakemake.params.registers},
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        corpus=snakemake.input.corpus,
        corpus_sha256=corpus_meta["corpus_sha256"],
        context_token=context_token(loaded.tokenizer)[1],
        doc_ids=documents["doc_id"].to_list(),
    )
    model = pl.lit(snakemake.wildcards.model, pl.String).alias("model")
    write_parquet_with_provenance(table.select(model, pl.all()), snakemake.output.table, meta)
    write_parquet_with_provenance(per_document.select(model, pl.all()), snakemake.output.documents, meta)
