rule measure_geometry:
    """Per-layer geometry of a store (METHODS §8), before and after each post-processing, per register; its massive tokens."""
    input:
        manifest="results/models/{model}/manifest.json",
        store="results/activations/{model}/{corpus}.h5",
    output:
        metrics="results/geometry/{model}/{corpus}.parquet",
        rogue="results/geometry/{model}/{corpus}.rogue.parquet",
        flow="results/geometry/{model}/{corpus}.flow.parquet",
        massive="results/geometry/{model}/{corpus}.massive.parquet",
    log:
        "logs/geometry/{model}/{corpus}.log",
    conda:
        ENV
    threads: model_threads(4)
    resources:
        mem_mb=memory_per_attempt(4000),  # grows on each retry (workflow/profiles)
    params:
        settings=with_member_layers("geometry"),
    script:
        "../scripts/measure_geometry.py"


rule check_readout_rescaling:
    """Steck et al.: moving the final norm's gain into W_U leaves logits unchanged but moves readout cosines."""
    input:
        manifest="results/models/{model}/manifest.json",
        corpus=f"results/corpora/{config['run']['corpora'][0]}.parquet",
    output:
        table="results/geometry/{model}/readout.parquet",
    log:
        "logs/geometry/{model}/readout.log",
    conda:
        ENV
    threads: 4
    resources:
        gpu=1,
    params:
        split=config["evaluation"]["split"],
        texts=config["evaluation"]["readout_texts"],
    script:
        "../scripts/check_readout_rescaling.py"


rule relate_geometry:
    """Correlate geometry (per depth band) with performance across models and registers."""
    input:
        unpack(get_geometry_models),
    output:
        table="results/geometry/{corpus}.relations.parquet",
    log:
        "logs/geometry/{corpus}.relations.log",
    conda:
        ENV
    script:
        "../scripts/relate_geometry.py"


rule plot_geometry:
    """Geometry of one model: metrics by layer per post-processing, rogue dimensions, registers by layer."""
    input:
        metrics="results/geometry/{model}/{corpus}.parquet",
        rogue="results/geometry/{model}/{corpus}.rogue.parquet",
    output:
        **figure_outputs(
            "results/figures/geometry/{model}.{corpus}",
            GEOMETRY_MODEL_FIGURES,
            "geometry",
            "Geometry",
            {"model": "{model}", "corpus": "{corpus}"},
        ),
    log:
        "logs/figures/{model}.{corpus}.geometry.log",
    conda:
        ENV
    script:
        "../scripts/plot_geometry.py"


rule plot_geometry_models:
    """Geometry across models by relative depth, and geometry against performance."""
    input:
        unpack(get_geometry_models),
        relations="results/geometry/{corpus}.relations.parquet",
    output:
        **figure_outputs(
            "results/figures/geometry/{corpus}",
            GEOMETRY_CORPUS_FIGURES,
            "geometry",
            "Geometry",
            {"model": "all", "corpus": "{corpus}"},
        ),
    log:
        "logs/figures/{corpus}.geometry.log",
    conda:
        ENV
    script:
        "../scripts/plot_geometry_models.py"
