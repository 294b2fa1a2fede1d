"""Entry point of rule build_atlas (rules/atlas.smk)."""

from pathlib import Path

import polars as pl
import torch

from latent_atlas.atlas.data import AtlasSettings, atlas_data
from latent_atlas.atlas.page import write_page
from latent_atlas.joblog import job_log
from latent_atlas.lenses.base import Unembed
from latent_atlas.lenses.tuned import TunedLens
from latent_atlas.models import load_model
from latent_atlas.neighbourhood.pipeline import open_store
from latent_atlas.provenance import provenance_record

with job_log(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    inputs = dict(snakemake.input.items())  # the tuned lens and steering tables are there only where they ran
    settings = AtlasSettings.from_config(snakemake.params.settings)
    loaded = load_model(Path(inputs["manifest"]).parent, device="cpu")
    tuned = TunedLens.load(inputs["tuned"], Unembed.from_parts(loaded.parts)) if "tuned" in inputs else None
    steering = {
        name.removeprefix("steering_"): pl.read_parquet(path)
        for name, path in inputs.items()
        if name.startswith("steering_")
    }
    with open_store(inputs["store"], loaded) as store:
        payload = atlas_data(loaded, store, tuned, steering, settings, log.info)
    payload["meta"]["provenance"] = provenance_record(
        dict(snakemake.params.settings),
        model=snakemake.wildcards.model,
        model_sha256=loaded.manifest["weights_sha256"],
        store=inputs["store"],
        tuned_lens=inputs.get("tuned"),
        steering=sorted(steering),
    )
    kept = write_page(payload, snakemake.output.page, settings.max_bytes)
    log.info("%d of %d documents fit in atlas.max_bytes", len(kept["documents"]), len(payload["documents"]))
