"""Entry point of rule evaluate_performance (rules/evaluation.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.evaluation import context_token, evaluate_corpus
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    settings = snakemake.params.settings
    corpus, corpus_meta = load_corpus_table(snakemake.input.corpus)
    table = evaluate_corpus(loaded, corpus, settings["split"], settings["max_length"])
    _, context = context_token(loaded.tokenizer)
    overall = table.filter(pl.col("register") == "all")
    log.info(
        "%s: perplexity %.2f, %.3f bits/byte",
        snakemake.wildcards.model,
        overall["perplexity"][0],
        overall["bits_per_byte"][0],
    )
    meta = provenance_record(
        {"evaluation": settings},
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        corpus=snakemake.input.corpus,
        corpus_sha256=corpus_meta["corpus_sha256"],
        context_token=context,
    )
    table = table.with_columns(model=pl.lit(snakemake.wildcards.model), corpus=pl.lit(snakemake.wildcards.corpus))
    write_parquet_with_provenance(table, snakemake.output.table, meta)
