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


rule plot_token_grid:
    """Logit- and tuned-lens top tokens at every (layer, position) of an example sentence."""
    input:
        unpack(get_grid_inputs),
    output:
        table="results/lenses/{model}/{corpus}.grid.parquet",
        pdf=report(
            "results/figures/lenses/{model}.{corpus}.grid.pdf",
            caption="../workflow/report/lens_grid.rst",
            category="Lenses",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "figure": "token grid (pdf)",
            },
        ),
        png=report(
            "results/figures/lenses/{model}.{corpus}.grid.png",
            caption="../workflow/report/lens_grid.rst",
            category="Lenses",
            labels={"model": "{model}", "corpus": "{corpus}", "figure": "token grid"},
        ),
    log:
        "logs/figures/{model}.{corpus}.grid.log",
    conda:
        ENV
    params:
        settings=config["lenses"],
    script:
        "../scripts/plot_token_grid.py"
