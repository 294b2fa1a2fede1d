"""Entry point of rule prepare_corpus (rules/corpora.smk)."""

from latent_atlas.corpus import read_corpus, write_corpus
from latent_atlas.joblog import job_log

with job_log(snakemake.log[0]) as log:
    table = read_corpus(snakemake.wildcards.corpus, snakemake.params.spec)
    meta = write_corpus(table, snakemake.output.table, snakemake.params.spec)
    log.info("wrote %s: %d documents, sha256 %s", snakemake.output.table, table.height, meta["corpus_sha256"])
    for label, split, count in table.group_by(["label", "split"]).len().sort(["label", "split"]).iter_rows():
        log.info("  %s / %s: %d documents", label, split, count)
