localrules:
    plot_store_norms,


rule plot_store_norms:
    """Mean residual norm by layer and register: a first look at a store (and a check it is sane)."""
    input:
        store="results/activations/{model}/{corpus}.h5",
    output:
        pdf=report(
            "results/figures/activations/{model}.{corpus}.norms.pdf",
            caption="../workflow/report/store_norms.rst",
            category="Activation store",
            labels={"model": "{model}", "corpus": "{corpus}", "figure": "norms (pdf)"},
        ),
        png=report(
            "results/figures/activations/{model}.{corpus}.norms.png",
            caption="../workflow/report/store_norms.rst",
            category="Activation store",
            labels={"model": "{model}", "corpus": "{corpus}", "figure": "norms"},
        ),
        table="results/activations/{model}/{corpus}.norms.parquet",
    log:
        "logs/figures/{model}.{corpus}.norms.log",
    conda:
        ENV
    script:
        "../scripts/plot_store_norms.py"
