localrules:
    plot_neighbourhood,
    plot_path,


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
        **figure_outputs(
            "results/figures/neighbourhood/{model}.{corpus}",
            ["steered-states"],
            "neighbourhood",
            "Neighbourhoods",
            {"model": "{model}", "corpus": "{corpus}"},
            shown={"steered-states": "steered states"},
            captions={"steered-states": "steered"},
        ),
        table="results/neighbourhood/{model}/{corpus}/steered-states.parquet",
        summary="results/neighbourhood/{model}/{corpus}/steered-states.summary.parquet",
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


rule plot_neighbourhood:
    """Stability curves (metric vs radius per direction family) and the PCA map of a point's neighbourhood."""
    input:
        table="results/neighbourhood/{model}/{corpus}/{point}.parquet",
    output:
        **figure_outputs(
            "results/figures/neighbourhood/{model}.{corpus}.{point}",
            NEIGHBOURHOOD_POINT_FIGURES,
            "neighbourhood",
            "Neighbourhoods",
            {"model": "{model}", "corpus": "{corpus}", "point": "{point}"},
        ),
    log:
        "logs/figures/{model}.{corpus}.{point}.neighbourhood.log",
    conda:
        ENV
    script:
        "../scripts/plot_neighbourhood.py"


rule plot_path:
    """Decoded top token along an interpolation path (linear and slerp) for every decoder."""
    input:
        table="results/neighbourhood/{model}/{corpus}/{path}.parquet",
    output:
        **figure_outputs(
            "results/figures/neighbourhood/{model}.{corpus}.{path}",
            ["path"],
            "neighbourhood",
            "Neighbourhoods",
            {"model": "{model}", "corpus": "{corpus}", "point": "{path}"},
        ),
    log:
        "logs/figures/{model}.{corpus}.{path}.path.log",
    conda:
        ENV
    script:
        "../scripts/plot_path.py"
