localrules:
    prepare_corpus,


rule prepare_corpus:
    """Read a corpus into the documents table (doc_id, text, label, split, source)."""
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
