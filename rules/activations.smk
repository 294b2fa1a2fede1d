rule extract_activations:
    """Run a model over a corpus and stream its residual states into the HDF5 activation store."""
    input:
        manifest="results/models/{model}/manifest.json",
        corpus="results/corpora/{corpus}.parquet",
    output:
        store="results/activations/{model}/{corpus}.h5",
    log:
        "logs/activations/{model}/{corpus}.log",
    conda:
        ENV
    threads: model_threads(8)  # torch threads; capped by --cores locally, set per cluster in its profile
    resources:
        gpu=1,
    params:
        settings=with_member_layers("extraction"),
        model=get_model_spec,
        provenance=get_extraction_provenance,
    script:
        "../scripts/extract_activations.py"
