localrules:
    plot_steering,


rule steer_with_vectors:
    """Sweep a generation method (ActAdd, mean difference, in-context vectors) over layers x strengths."""
    input:
        unpack(get_steering_inputs),
    output:
        table="results/steering/{model}/{method}.parquet",
        states="results/steering/{model}/{method}.states.h5",
    log:
        "logs/steering/{model}/{method}.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        settings=lambda wildcards: steering_settings(wildcards.method),
    script:
        "../scripts/steer_with_vectors.py"


rule steer_heads:
    """Inference-time intervention: per-head probes on true/false statements, the top heads shifted."""
    input:
        unpack(get_steering_inputs),
        facts=config["steering"]["iti"]["facts"],
    output:
        table="results/steering/{model}/iti.parquet",
        probes="results/steering/{model}/iti.probes.parquet",
    log:
        "logs/steering/{model}/iti.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        settings=steering_settings("iti"),
    script:
        "../scripts/steer_heads.py"


rule optimise_steering_vectors:
    """Optimise one vector per target sentence so that greedy decoding from the start token reproduces it."""
    input:
        unpack(get_steering_inputs),
    output:
        table="results/steering/{model}/optimised.parquet",
    log:
        "logs/steering/{model}/optimised.log",
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        settings=steering_settings("optimised"),
    script:
        "../scripts/optimise_steering_vectors.py"


rule summarise_steering:
    """Per setting: mean sentiment, perplexity, truth accuracy, recovery, each with a 95% bootstrap interval
    over prompts, items or target sentences, and paired changes from the unsteered model.
    """
    input:
        unpack(get_steering_method_tables),
    output:
        summary="results/steering/{model}/summary.parquet",
    log:
        "logs/steering/{model}/summary.log",
    conda:
        ENV
    params:
        seed=config["steering"]["seed"],
    script:
        "../scripts/summarise_steering.py"


rule plot_steering:
    """Steering figures: effect vs strength, effect vs fluency, the ITI probe map, example continuations."""
    input:
        unpack(get_steering_tables),
    output:
        **figure_outputs(
            "results/figures/steering/{model}",
            steering_figures(),
            "steering",
            "Steering",
            {"model": "{model}"},
        ),
    log:
        "logs/figures/{model}.steering.log",
    conda:
        ENV
    script:
        "../scripts/plot_steering.py"
