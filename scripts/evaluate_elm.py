"""Entry point of rule evaluate_elm (rules/readers.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.corpus import load_corpus_table
from latent_atlas.joblog import job_log
from latent_atlas.models import load_model
from latent_atlas.provenance import write_parquet_with_provenance
from latent_atlas.readers.elm import load_adapter
from latent_atlas.readers.pipeline import elm_data, evaluate_elm, reader_provenance, summarise_controls
from latent_atlas.readers.settings import ElmSettings
from latent_atlas.readers.uncertainty import elm_controls
from latent_atlas.store import ActivationStore

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    section, inputs = snakemake.params.settings, snakemake.input  # section: what the provenance's config hash covers
    settings = ElmSettings.from_config(section)
    loaded = load_model(Path(inputs.manifest).parent, device="auto")
    adapter, trained = load_adapter(inputs.adapter, loaded)
    judge_dir = Path(inputs.judge).parent if hasattr(inputs, "judge") else None
    judge = load_model(judge_dir, device="auto") if judge_dir else None
    judged = {"judge": judge_dir.name, "judge_sha256": judge.manifest["weights_sha256"]} if judge else {}
    corpus, _ = load_corpus_table(inputs.corpus)
    with ActivationStore(inputs.store, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        data = elm_data(loaded.tokenizer, store, corpus, settings)
        model = snakemake.wildcards.model
        meta = reader_provenance(loaded, model, section, store, adapter_created=trained.get("created"), **judged)
    scores, paths = evaluate_elm(loaded, adapter, data, settings, judge)
    with pl.Config(tbl_cols=-1, tbl_width_chars=160):
        log.info("held-out controls:\n%s", summarise_controls(scores))
        log.info("paired by passage, control − own (the claim's statistic):\n%s", elm_controls(scores))
    write_parquet_with_provenance(scores.with_columns(model=pl.lit(model)), snakemake.output.scores, meta)
    write_parquet_with_provenance(paths.with_columns(model=pl.lit(model)), snakemake.output.paths, meta)
