rule extract_activations:
    """Run a model over a corpus and stream its residual states into the HDF5 activation store."""
    input:
        manifest="results/models/{model}/manifest.json",
        corpus="results/corpora/{corpus}.parquet",
    output:
        store="results/activations/{model}/{corpus}.h5",
    params:
        settings=config["extraction"],
        provenance=get_extraction_provenance,
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        "logs/activations/{model}/{corpus}.log",
    conda:
        ENV
    script:
        "../scripts/extract_activations.py"
