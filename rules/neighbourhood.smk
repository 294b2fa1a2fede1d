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
