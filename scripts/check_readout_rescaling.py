"""Entry point of rule check_readout_rescaling (rules/geometry.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.geometry.readout import readout_rescaling, readout_texts
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    corpus, corpus_meta = load_corpus_table(snakemake.input.corpus)
    texts = readout_texts(corpus, snakemake.params.split, snakemake.params.texts)
    table = readout_rescaling(loaded, texts)
    meta = provenance_record(
        {"split": snakemake.params.split, "texts": snakemake.params.texts},
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        corpus=snakemake.input.corpus,
        corpus_sha256=corpus_meta["corpus_sha256"],
    )
    write_parquet_with_provenance(
        table.with_columns(model=pl.lit(snakemake.wildcards.model)), snakemake.output.table, meta
    )
