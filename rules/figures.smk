localrules:
    plot_store_norms,
    plot_lens_comparison,
    plot_neighbourhood,
    plot_path,
    plot_steering,


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


rule plot_neighbourhood:
    """Stability curves (metric vs radius per direction family) and the PCA map of a point's neighbourhood."""
    input:
        table="results/neighbourhood/{model}/{corpus}/{point}.parquet",
    output:
        stability_pdf=report(
            "results/figures/neighbourhood/{model}.{corpus}.{point}.stability.pdf",
            caption="../workflow/report/neighbourhood_stability.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "point": "{point}",
                "figure": "stability (pdf)",
            },
        ),
        stability_png=report(
            "results/figures/neighbourhood/{model}.{corpus}.{point}.stability.png",
            caption="../workflow/report/neighbourhood_stability.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "point": "{point}",
                "figure": "stability",
            },
        ),
        map_pdf=report(
            "results/figures/neighbourhood/{model}.{corpus}.{point}.map.pdf",
            caption="../workflow/report/neighbourhood_map.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "point": "{point}",
                "figure": "map (pdf)",
            },
        ),
        map_png=report(
            "results/figures/neighbourhood/{model}.{corpus}.{point}.map.png",
            caption="../workflow/report/neighbourhood_map.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "point": "{point}",
                "figure": "map",
            },
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
        pdf=report(
            "results/figures/neighbourhood/{model}.{corpus}.{path}.path.pdf",
            caption="../workflow/report/neighbourhood_path.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "point": "{path}",
                "figure": "path (pdf)",
            },
        ),
        png=report(
            "results/figures/neighbourhood/{model}.{corpus}.{path}.path.png",
            caption="../workflow/report/neighbourhood_path.rst",
            category="Neighbourhoods",
            labels={
                "model": "{model}",
                "corpus": "{corpus}",
                "point": "{path}",
                "figure": "path",
            },
        ),
    log:
        "logs/figures/{model}.{corpus}.{path}.path.log",
    conda:
        ENV
    script:
        "../scripts/plot_path.py"


rule plot_steering:
    """Steering figures: effect vs strength, effect vs fluency, the ITI probe map, example continuations."""
    input:
        unpack(get_steering_tables),
    output:
        **steering_figure_outputs(),
    log:
        "logs/figures/{model}.steering.log",
    conda:
        ENV
    script:
        "../scripts/plot_steering.py"


rule plot_geometry:
    """Geometry of one model: metrics by layer per post-processing, rogue dimensions, registers by layer."""
    input:
        metrics="results/geometry/{model}/{corpus}.parquet",
        rogue="results/geometry/{model}/{corpus}.rogue.parquet",
    output:
        **figure_outputs(
            "results/figures/geometry/{model}.{corpus}",
            GEOMETRY_MODEL_FIGURES,
            "geometry",
            "Geometry",
            {"model": "{model}", "corpus": "{corpus}"},
        ),
    log:
        "logs/figures/{model}.{corpus}.geometry.log",
    conda:
        ENV
    script:
        "../scripts/plot_geometry.py"


rule plot_geometry_models:
    """Geometry across models by relative depth, and geometry against performance."""
    input:
        unpack(get_geometry_models),
        relations="results/geometry/{corpus}.relations.parquet",
    output:
        **figure_outputs(
            "results/figures/geometry/{corpus}",
            GEOMETRY_CORPUS_FIGURES,
            "geometry",
            "Geometry",
            {"model": "all", "corpus": "{corpus}"},
        ),
    log:
        "logs/figures/{corpus}.geometry.log",
    conda:
        ENV
    script:
        "../scripts/plot_geometry_models.py"
