"""Entry point of rule explore_neighbourhood (rules/neighbourhood.smk)."""

from pathlib import Path

import torch

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import load_lenses
from latent_atlas.models import load_model
from latent_atlas.neighbourhood.pipeline import NeighbourhoodSettings, explore_point, neighbours_of_point, open_store
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    params, point = snakemake.params, snakemake.wildcards.point
    settings = NeighbourhoodSettings.from_config(params.settings)
    lenses = load_lenses(loaded, snakemake.input.tuned, params.lenses)
    with open_store(snakemake.input.store, loaded) as store:
        table = explore_point(loaded, store, point, params.probes, lenses, settings)
        neighbours = neighbours_of_point(loaded, store, point, params.probes, settings)
    meta = provenance_record(
        {"neighbourhood": params.settings, "probes": params.probes, "lenses": params.lenses},
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        store=snakemake.input.store,
        tuned_lens=snakemake.input.tuned,
    )
    write_parquet_with_provenance(table, snakemake.output.table, meta)
    write_parquet_with_provenance(neighbours, snakemake.output.neighbours, meta)
