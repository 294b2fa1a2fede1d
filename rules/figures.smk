localrules:
    plot_store_norms,
    plot_lens_comparison,


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


rule plot_lens_comparison:
    """Per-layer lens curves (KL, CE, top-1 agreement) and agreement with ordinary logits."""
    input:
        table="results/lenses/{model}/{corpus}.parquet",
    output:
        curves_pdf=report(
            "results/figures/lenses/{model}.{corpus}.curves.pdf",
            caption="../workflow/report/lens_curves.rst",
            category="Lenses",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "figure": "curves (pdf)",
            },
        ),
        curves_png=report(
            "results/figures/lenses/{model}.{corpus}.curves.png",
            caption="../workflow/report/lens_curves.rst",
            category="Lenses",
            labels={"model": "{model}", "corpus": "{corpus}", "figure": "curves"},
        ),
        agreement_pdf=report(
            "results/figures/lenses/{model}.{corpus}.agreement.pdf",
            caption="../workflow/report/lens_agreement.rst",
            category="Lenses",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "figure": "agreement (pdf)",
            },
        ),
        agreement_png=report(
            "results/figures/lenses/{model}.{corpus}.agreement.png",
            caption="../workflow/report/lens_agreement.rst",
            category="Lenses",
            labels={"model": "{model}", "corpus": "{corpus}", "figure": "agreement"},
        ),
    log:
        "logs/figures/{model}.{corpus}.lenses.log",
    conda:
        ENV
    script:
        "../scripts/plot_lens_comparison.py"
