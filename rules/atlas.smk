# The atlas (src/latent_atlas/atlas/): one self-contained HTML page per model x corpus to explore what each
# sampled token's state reads as, layer by layer. Its input function is the library's (light, no torch).
from latent_atlas.atlas import inputs as atlas_inputs, outputs as atlas_outputs


rule build_atlas:
    """Lens readings, norms, exact neighbours and steered continuations of sampled documents, as one HTML page."""
    input:
        unpack(
            lambda wildcards: atlas_inputs(config, wildcards.model, wildcards.corpus)
        ),
    output:
        page=report(
            "results/atlas/{model}.{corpus}.html",
            caption="../workflow/report/atlas.rst",
            category="Atlas",
            labels={"model": "{model}", "corpus": "{corpus}", "figure": "atlas"},
        ),
    log:
        "logs/atlas/{model}.{corpus}.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=memory_per_attempt(3000),  # the model, one chunk of V-sized logits per lens
    params:
        settings=lambda wildcards: config["atlas"]
        | {"massive_multiple": config["geometry"]["massive_multiple"]},
    script:
        "../scripts/build_atlas.py"
