"""Entry point of rule acquire_model (rules/models.smk)."""

from pathlib import Path

from latent_atlas.joblog import job_log
from latent_atlas.models import acquire_model

with job_log(snakemake.log[0]) as log:
    model_dir = Path(snakemake.output.manifest).parent
    manifest = acquire_model(
        snakemake.wildcards.model, snakemake.params.spec, model_dir, snakemake.params.resources_dir
    )
    log.info("wrote %s (%s parameters, %s layers)", model_dir, manifest["n_params"], manifest["n_layers"])
