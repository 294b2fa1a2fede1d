# Learned readers (config key `readers`): semantic clustering against its baselines per task, and the ELM
# adapter (train, then evaluate against its controls), on the stored states of each task's corpus.


localrules:
    plot_readers,


rule compare_readers:
    """Semantic clustering and its baselines (LoRA included) on one task's split, for every seed; each state
    reader on both inputs (the raw text's last state, the template's answer position).
    """
    input:
        unpack(get_reader_task_inputs),
    output:
        table="results/readers/{model}/clustering/{task}.parquet",
    log:
        "logs/readers/{model}/clustering/{task}.log",
    priority: 2  # the longest jobs after extraction go first: longest-first packs 2 cores with least idle
    conda:
        ENV
    threads: 8  # templated states, in-context learning and LoRA run the model; capped by --cores locally
    resources:
        gpu=1,
    params:
        task=lambda wildcards: config["readers"]["tasks"][wildcards.task],
        settings=clustering_settings(),
        lora=config["readers"]["lora"],
        max_tokens=config["readers"]["max_tokens"],
    script:
        "../scripts/compare_readers.py"


rule train_elm:
    """Train the ELM adapter (stage 1: the model frozen) on the task corpus's training passages."""
    input:
        unpack(get_elm_inputs),
    output:
        adapter="results/readers/{model}/elm/adapter.pt",
        losses="results/readers/{model}/elm/losses.parquet",
    log:
        "logs/readers/{model}/elm/train.log",
    priority: 2
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        settings=elm_settings("train"),
    script:
        "../scripts/train_elm.py"


rule evaluate_elm:
    """Held-out reconstruction loss, generated registers and semantic consistency against the shuffled and
    no-embedding controls; descriptions along an interpolation and a direction."""
    input:
        unpack(get_elm_inputs),
        unpack(get_elm_judge),
        adapter="results/readers/{model}/elm/adapter.pt",
    output:
        scores="results/readers/{model}/elm/evaluation.parquet",
        paths="results/readers/{model}/elm/paths.parquet",
    log:
        "logs/readers/{model}/elm/evaluate.log",
    priority: 2
    conda:
        ENV
    threads: 8
    resources:
        gpu=1,
    params:
        settings=elm_settings("evaluate"),
    script:
        "../scripts/evaluate_elm.py"


rule plot_readers:
    """The readers' figures: method comparison, ELM curves and controls, descriptions, paths."""
    input:
        unpack(get_reader_tables),
    output:
        **figure_outputs(
            "results/figures/readers/{model}",
            reader_figures(),
            "readers",
            "Learned readers",
            {"model": "{model}"},
        ),
    log:
        "logs/figures/{model}.readers.log",
    conda:
        ENV
    params:
        examples=config["readers"]["elm"]["examples"],
    script:
        "../scripts/plot_readers.py"
