"""Entry point of rule project_parameters (rules/lenses.smk)."""

from pathlib import Path

import torch

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import project_parameters
from latent_atlas.models import load_model
from latent_atlas.provenance import provenance_record, write_parquet_with_provenance

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="cpu")
    tables = project_parameters(loaded, snakemake.params.settings)
    meta = provenance_record(dict(snakemake.params.settings), model_sha256=loaded.manifest["weights_sha256"])
    for name, table in tables.items():
        write_parquet_with_provenance(table, snakemake.output[name], meta)
