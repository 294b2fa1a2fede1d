rule explore_neighbourhood:
    """Sample around a probe along four direction families, decode every sample, list its data neighbours."""
    input:
        unpack(get_neighbourhood_inputs),
    output:
        table="results/neighbourhood/{model}/{corpus}/{point}.parquet",
        neighbours="results/neighbourhood/{model}/{corpus}/{point}.neighbours.parquet",
    log:
        "logs/neighbourhood/{model}/{corpus}/{point}.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        probes=neighbourhood_probes,
        settings=NEIGHBOURHOOD_SETTINGS,
        lenses=NEIGHBOURHOOD_LENSES,
    script:
        "../scripts/explore_neighbourhood.py"


rule explore_path:
    """Interpolate (linear, slerp) and extrapolate between two probes; decode every step."""
    input:
        unpack(get_neighbourhood_inputs),
    output:
        table="results/neighbourhood/{model}/{corpus}/{path}.parquet",
    log:
        "logs/neighbourhood/{model}/{corpus}/{path}.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        probes=neighbourhood_probes,
        ends=lambda wildcards: config["neighbourhood"]["paths"][wildcards.path],
        settings=NEIGHBOURHOOD_SETTINGS,
        lenses=NEIGHBOURHOOD_LENSES,
    script:
        "../scripts/explore_path.py"


rule place_steered_states:
    """Place steered continuations' states relative to the stored data and read them with lenses, by strength."""
    input:
        unpack(get_steered_states_inputs),
    output:
        table="results/neighbourhood/{model}/{corpus}/steered-states.parquet",
        summary="results/neighbourhood/{model}/{corpus}/steered-states.summary.parquet",
        pdf=report(
            "results/figures/neighbourhood/{model}.{corpus}.steered-states.pdf",
            caption="../workflow/report/neighbourhood_steered.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "figure": "steered states (pdf)",
            },
        ),
        png=report(
            "results/figures/neighbourhood/{model}.{corpus}.steered-states.png",
            caption="../workflow/report/neighbourhood_steered.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "figure": "steered states",
            },
        ),
    log:
        "logs/neighbourhood/{model}/{corpus}/steered-states.log",
    conda:
        ENV
    threads: 2
    params:
        methods=steered_methods(),
        settings=STEERED_STATES_SETTINGS,
    script:
        "../scripts/place_steered_states.py"
