"""Entry point of rule plot_token_grid (rules/lenses.smk)."""

from pathlib import Path

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import grid_for_text
from latent_atlas.models import load_model
from latent_atlas.plots.lenses import plot_token_grid
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    loaded = load_model(Path(snakemake.input.manifest).parent, device="cpu")
    settings = snakemake.params.settings
    table = grid_for_text(loaded, snakemake.input.tuned, settings)
    meta = provenance_record(dict(settings), model_sha256=loaded.manifest["weights_sha256"])
    write_parquet_with_provenance(table, snakemake.output.table, meta)
    title = f"{snakemake.wildcards.model} · tuned lens from {snakemake.wildcards.corpus}"
    plot_token_grid(table, snakemake.output.grid_pdf, snakemake.output.grid_png, title)
