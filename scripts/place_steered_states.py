"""Entry point of rule place_steered_states (rules/neighbourhood.smk)."""

from pathlib import Path

import torch

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import load_lenses
from latent_atlas.models import load_model
from latent_atlas.neighbourhood.pipeline import NeighbourhoodSettings, open_store
from latent_atlas.neighbourhood.steered import LENSES, place_steered_states, summarise_placement
from latent_atlas.plots.steered import plot_steered_states
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    params, output = snakemake.params, snakemake.output
    tuned = snakemake.input.get("tuned")  # none when the model has no tuned lens
    lenses = {name: lens for name, lens in load_lenses(loaded, tuned, {}).items() if name in LENSES}
    files = {method: snakemake.input[method] for method in params.methods}
    with open_store(snakemake.input.store, loaded) as store:
        table = place_steered_states(loaded, store, files, lenses, NeighbourhoodSettings.from_config(params.settings))
    summary = summarise_placement(table, seed=params.settings.get("seed", 0))
    meta = provenance_record(
        {"neighbourhood": params.settings, "methods": params.methods},
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        store=snakemake.input.store,
        states={method: str(path) for method, path in files.items()},
        tuned_lens=tuned,
    )
    write_parquet_with_provenance(table, output.table, meta)
    write_parquet_with_provenance(summary, output.summary, meta)
    stamp = f"{snakemake.wildcards.model} · {snakemake.wildcards.corpus} · intervals over prompts"
    plot_steered_states(summary, output.steered_states_pdf, output.steered_states_png, stamp)
