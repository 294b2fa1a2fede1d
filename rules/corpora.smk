localrules:
    prepare_corpus,


rule prepare_corpus:
    """Read a corpus (a file, a hub dataset or the training family's unseen splits) into the documents table."""
    input:
        get_corpus_source,
    output:
        table="results/corpora/{corpus}.parquet",
    log:
        "logs/corpora/{corpus}.log",
    conda:
        ENV
    params:
        spec=get_corpus_spec,
    script:
        "../scripts/prepare_corpus.py"
