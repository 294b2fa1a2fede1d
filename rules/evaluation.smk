rule evaluate_performance:
    """Perplexity and bits-per-byte of a model on a corpus split, overall and per register."""
    input:
        manifest="results/models/{model}/manifest.json",
        corpus="results/corpora/{corpus}.parquet",
    output:
        table="results/evaluation/{model}/{corpus}.parquet",
    log:
        "logs/evaluation/{model}/{corpus}.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
        mem_mb=memory_per_attempt(4000),  # grows on each retry (workflow/profiles)
    params:
        settings=config["evaluation"],
    script:
        "../scripts/evaluate_performance.py"
