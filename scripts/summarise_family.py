"""Entry point of rule summarise_family (rules/training.smk)."""

import json
from pathlib import Path

import polars as pl

from latent_atlas.geometry.relations import relate
from latent_atlas.joblog import job_log
from latent_atlas.provenance import provenance_record, read_tables, write_parquet_with_provenance
from latent_atlas.training.evaluate import (
    add_rank_fraction,
    lens_depths,
    performance_matrix,
    specialisation,
    specialisation_intervals,
    tag_models,
)

with job_log(snakemake.log[0]) as log:
    mixtures = snakemake.params.mixtures
    members = list(mixtures)
    inputs, out = snakemake.input, snakemake.output
    documents = tag_models(read_tables(inputs.documents), members)
    matrix = performance_matrix([pl.read_parquet(path) for path in inputs.performance], mixtures)
    checks = (
        specialisation(matrix, mixtures)
        .join(specialisation_intervals(documents, mixtures), on="register", how="full", coalesce=True)
        .sort("register")
    )
    manifests = [json.loads(Path(path).read_text()) for path in inputs.manifests]
    n_layers = {manifest["name"]: manifest["n_layers"] for manifest in manifests}
    widths = {manifest["name"]: manifest["d_model"] for manifest in manifests}
    geometry = tag_models(add_rank_fraction(read_tables(inputs.geometry), widths), members)
    lenses = tag_models(lens_depths(read_tables(inputs.lenses), n_layers), members)
    losses = read_tables(inputs.losses)
    relations = relate(geometry, matrix.select("model", "register", "perplexity", "bits_per_byte"))
    meta = provenance_record({"training": snakemake.params.training}, members=members)
    for table, path in [
        (matrix, out.performance),
        (documents, out.documents),
        (checks, out.specialisation),
        (geometry, out.geometry),
        (lenses, out.lenses),
        (losses, out.losses),
        (relations, out.relations),
    ]:
        write_parquet_with_provenance(table, path, meta)
    for row in checks.iter_rows(named=True):
        verdict = "holds" if row["holds"] else "FAILS (the training budget is too small to specialise)"
        log.info(
            "%s: %s %.1f vs %s %.1f: %s",
            row["register"],
            row["trained_member"],
            row["trained_perplexity"],
            row["unseen_member"],
            row["unseen_perplexity"],
            verdict,
        )
    for row in checks.filter(pl.col("own_member").is_not_null()).iter_rows(named=True):
        log.info(
            "%s: best other (%s) − own (%s) = %+.3f bits/byte [%.3f, %.3f] over %d documents",
            row["register"], row["best_other_member"], row["own_member"], row["delta_bits_per_byte"],
            row["ci_low"], row["ci_high"], row["n"],
        )  # fmt: skip
