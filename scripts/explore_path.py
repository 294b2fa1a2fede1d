"""Entry point of rule explore_path (rules/neighbourhood.smk)."""

from pathlib import Path

import torch

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import load_lenses
from latent_atlas.models import load_model
from latent_atlas.neighbourhood.pipeline import NeighbourhoodSettings, explore_path, open_store
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    params, path = snakemake.params, snakemake.wildcards.path
    settings = NeighbourhoodSettings.from_config(params.settings)
    lenses = load_lenses(loaded, snakemake.input.tuned, params.lenses)
    with open_store(snakemake.input.store, loaded) as store:
        table = explore_path(loaded, store, path, params.ends, params.probes, lenses, settings)
    meta = provenance_record(
        {"neighbourhood": params.settings, "probes": params.probes, "ends": params.ends, "lenses": params.lenses},
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        store=snakemake.input.store,
        tuned_lens=snakemake.input.tuned,
    )
    write_parquet_with_provenance(table, snakemake.output.table, meta)
