# Claims (src/latent_atlas/claims/): the published findings the pipeline tests, decided per model x corpus
# from the tables of every analysis that ran for them, as a table, a report page and a figure.


localrules:
    decide_claims,


rule decide_claims:
    """Decide each published finding on one model x corpus: statistic, 95% interval, n, verdict."""
    input:
        unpack(get_claims_inputs),
    output:
        **figure_outputs(
            "results/figures/claims/{model}.{corpus}",
            ["claims"],
            "claims",
            "Claims",
            {"model": "{model}", "corpus": "{corpus}"},
        ),
        table="results/claims/{model}.{corpus}.parquet",
        page=report(
            "results/claims/{model}.{corpus}.html",
            caption="../workflow/report/claims_table.rst",
            category="Claims",
            labels={"model": "{model}", "corpus": "{corpus}", "figure": "table"},
        ),
    log:
        "logs/claims/{model}.{corpus}.log",
    conda:
        ENV
    params:
        settings=lambda wildcards: claims_settings(),
    script:
        "../scripts/decide_claims.py"
