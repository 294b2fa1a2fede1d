"""Entry point of rule read_probe (rules/lenses.smk)."""

from pathlib import Path

import torch

from latent_atlas.joblog import job_log
from latent_atlas.lenses.pipeline import read_probe
from latent_atlas.models import load_model
from latent_atlas.provenance import provenance_record, write_json

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    loaded = load_model(Path(snakemake.input.manifest).parent, device="auto")
    probes, settings = snakemake.params.probes, snakemake.params.settings
    reading = read_probe(loaded, snakemake.wildcards.probe, probes, snakemake.input.tuned, settings)
    reading["provenance"] = provenance_record(
        {"probe": probes[snakemake.wildcards.probe], "lenses": settings},
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        tuned_lens=snakemake.input.tuned,
    )
    write_json(snakemake.output.reading, reading)
