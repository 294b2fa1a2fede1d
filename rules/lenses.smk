localrules:
    plot_lens_comparison,


rule train_tuned_lens:
    """Train tuned-lens translators on the stored states of the training split."""
    input:
        manifest="results/models/{model}/manifest.json",
        store="results/activations/{model}/{corpus}.h5",
    output:
        lens="results/lenses/{model}/{corpus}.tuned-lens.pt",
    log:
        "logs/lenses/{model}/{corpus}.tuned.log",
    conda:
        ENV
    threads: model_threads(8)
    resources:
        mem_mb=memory_per_attempt(4000),  # grows on each retry (workflow/profiles)
    params:
        settings=tuned_lens_settings,
    script:
        "../scripts/train_tuned_lens.py"


rule evaluate_lenses:
    """Evaluate every lens at every lens layer on held-out tokens: KL, CE, entropy, agreement, rank.

    documents keeps each metric's sums per held-out document: the bootstrap unit of the curves' intervals
    and of paired comparisons between lenses (tuned vs logit lens in the claims).
    """
    input:
        manifest="results/models/{model}/manifest.json",
        store="results/activations/{model}/{corpus}.h5",
        tuned="results/lenses/{model}/{corpus}.tuned-lens.pt",
    output:
        table="results/lenses/{model}/{corpus}.parquet",
        documents="results/lenses/{model}/{corpus}.documents.parquet",
    log:
        "logs/lenses/{model}/{corpus}.evaluate.log",
    conda:
        ENV
    threads: model_threads(8)
    resources:
        mem_mb=memory_per_attempt(6000),  # V-sized float32 rows per lens and position (262k for Gemma 3)
    params:
        settings=with_member_layers("lenses"),
    script:
        "../scripts/evaluate_lenses.py"


rule read_probe:
    """Read one probe point with every lens and patchscope."""
    input:
        unpack(get_probe_inputs),
    output:
        reading="results/probes/{model}/{probe}.json",
    log:
        "logs/probes/{model}/{probe}.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        probes=lambda wildcards: probe_closure([wildcards.probe]),
        settings=config["lenses"],
    script:
        "../scripts/read_probe.py"


rule project_parameters:
    """Read MLP key/value vectors and head OV/QK circuits in the vocabulary; check them on held-out text.

    The tables mlp, heads and alignment need no forward pass; recall (Dar et al.'s aligned-vs-shuffled
    recall of a state's projection by its activated neurons) runs the model over projections.recall_positions
    positions of the corpus's projections.recall_split.
    """
    input:
        manifest="results/models/{model}/manifest.json",
        corpus=f"results/corpora/{config['projections'].get('recall_corpus') or config['run']['corpora'][0]}.parquet",
    output:
        mlp="results/projections/{model}/mlp.parquet",
        heads="results/projections/{model}/heads.parquet",
        alignment="results/projections/{model}/alignment.parquet",
        recall="results/projections/{model}/recall.parquet",
    log:
        "logs/projections/{model}.log",
    conda:
        ENV
    threads: 8
    params:
        settings=config["projections"],
    script:
        "../scripts/project_parameters.py"


rule plot_projection_recall:
    """Aligned vs shuffled recall of the states' projections by their activated neurons, per block."""
    input:
        recall="results/projections/{model}/recall.parquet",
    output:
        **figure_outputs(
            "results/figures/projections/{model}",
            ["recall"],
            "projections",
            "Projections",
            {"model": "{model}"},
        ),
    log:
        "logs/figures/{model}.projections.log",
    conda:
        ENV
    script:
        "../scripts/plot_projections.py"


rule plot_lens_comparison:
    """Per-layer lens curves (KL, CE, top-1 agreement) and agreement with ordinary logits."""
    input:
        table="results/lenses/{model}/{corpus}.parquet",
    output:
        **figure_outputs(
            "results/figures/lenses/{model}.{corpus}",
            ["curves", "agreement"],
            "lens",
            "Lenses",
            {"model": "{model}", "corpus": "{corpus}"},
        ),
    log:
        "logs/figures/{model}.{corpus}.lenses.log",
    conda:
        ENV
    script:
        "../scripts/plot_lens_comparison.py"


rule plot_token_grid:
    """Logit- and tuned-lens top tokens at every (layer, position) of an example sentence."""
    input:
        unpack(get_grid_inputs),
    output:
        **figure_outputs(
            "results/figures/lenses/{model}.{corpus}",
            ["grid"],
            "lens",
            "Lenses",
            {"model": "{model}", "corpus": "{corpus}"},
            shown={"grid": "token grid"},
        ),
        table="results/lenses/{model}/{corpus}.grid.parquet",
    log:
        "logs/figures/{model}.{corpus}.grid.log",
    conda:
        ENV
    params:
        settings=config["lenses"],
    script:
        "../scripts/plot_token_grid.py"
