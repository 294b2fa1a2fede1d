"""Entry point of rule gather_shards (rules/activations.smk): the shards, concatenated into one store."""

from latent_atlas.joblog import job_log
from latent_atlas.shards import gather_shards

with job_log(snakemake.log[0]) as log:
    path = gather_shards(snakemake.input.shards, snakemake.output.store, expect=snakemake.params.provenance)
    log.info("gathered %d shards into %s", len(snakemake.input.shards), path)
