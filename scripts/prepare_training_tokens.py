"""Entry point of rule prepare_training_tokens (rules/training.smk)."""

from pathlib import Path

import polars as pl

from latent_atlas.corpus import load_corpus_table
from latent_atlas.joblog import job_log
from latent_atlas.provenance import atomic_output, provenance_record, write_json
from latent_atlas.training.data import save_streams, tokenize_corpus, train_tokenizer
from latent_atlas.training.text import SPLITS

with job_log(snakemake.log[0]) as log:
    training = snakemake.params.training
    registers = list(training["registers"])
    corpus, corpus_meta = load_corpus_table(snakemake.input.corpus)
    spec = training["tokenizer"]
    if spec.get("model"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(snakemake.input.model).parent)
    else:
        texts = corpus.filter((pl.col("split") == "train") & pl.col("label").is_in(registers))["text"]
        tokenizer = train_tokenizer(iter(texts.to_list()), int(spec["vocab_size"]), int(spec.get("min_frequency", 2)))
    streams = tokenize_corpus(corpus, tokenizer, registers, SPLITS)
    out = snakemake.output
    with atomic_output(out.tokenizer) as tmp:
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / "provenance.json",
            provenance_record({"tokenizer": spec, "registers": registers}, corpus_sha256=corpus_meta["corpus_sha256"]),
        )
    with atomic_output(out.tokens) as tmp:
        save_streams(streams, tmp)
    for (split, register), stream in streams.items():
        log.info("%s/%s: %d documents, %d tokens", split, register, stream.n_documents, len(stream.ids))
