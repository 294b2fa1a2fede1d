"""Entry point of rule assemble_training_corpus (rules/training.smk)."""

from latent_atlas.joblog import job_log
from latent_atlas.training.debian import assemble_corpus, read_sources_config, sources_for_registers
from latent_atlas.training.hub import assemble_hub_corpus

with job_log(snakemake.log[0]) as log:
    spec = dict(snakemake.params.corpus)
    out = snakemake.output
    if spec.pop("source") == "hub":
        spec.pop("sources", None)  # a Debian sources file inherited from an overlaid config.yaml
        manifest = assemble_hub_corpus(spec, out.corpus, out.manifest)
    else:
        sources, settings = read_sources_config(spec["sources"])
        sources = sources_for_registers(sources, snakemake.params.registers, spec["sources"])
        manifest = assemble_corpus(sources, settings, snakemake.params.downloads, out.corpus, out.manifest)
    log.info("training corpus: %s", manifest["totals"])
