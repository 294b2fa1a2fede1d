localrules:
    plot_store_norms,


# extraction.shards = 1: one job writes the store. N > 1: N jobs each write a contiguous part of the same
# extraction plan (scatter), and one job concatenates them into the same single store (gather). Only one of
# the two paths is defined, so results/activations/{model}/{corpus}.h5 always has exactly one producer.
if SHARDS == 1:

    rule extract_activations:
        """Run a model over a corpus and stream its residual states into the HDF5 activation store."""
        input:
            manifest="results/models/{model}/manifest.json",
            corpus="results/corpora/{corpus}.parquet",
        output:
            store="results/activations/{model}/{corpus}.h5",
        log:
            "logs/activations/{model}/{corpus}.log",
        priority: 1  # stores first: every analysis of a model waits on one (a late store leaves cores idle)
        conda:
            ENV
        threads: model_threads(8)  # torch threads; capped by --cores locally, set per cluster in its profile
        resources:
            gpu=1,
            mem_mb=memory_per_attempt(4000),  # grows on each retry (workflow/profiles)
        params:
            settings=extraction_settings,
            model=get_model_spec,
            provenance=get_extraction_provenance,
        script:
            "../scripts/extract_activations.py"

else:

    rule extract_shard:
        """Extract one shard: a contiguous range of the store's batches, as a store of its own (temporary)."""
        input:
            manifest="results/models/{model}/manifest.json",
            corpus="results/corpora/{corpus}.parquet",
        output:
            store=temp("results/activations/{model}/{corpus}.shards/{shard}.h5"),
        log:
            "logs/activations/{model}/{corpus}.shards/{shard}.log",
        wildcard_constraints:
            shard=_alternatives([str(shard) for shard in range(SHARDS)]),
        priority: 1
        conda:
            ENV
        threads: model_threads(8)  # as extract_activations: one model per job
        resources:
            gpu=1,
            mem_mb=memory_per_attempt(4000),
        params:
            settings=extraction_settings,
            model=get_model_spec,
            provenance=get_extraction_provenance,
            shards=SHARDS,
        script:
            "../scripts/extract_shard.py"

    rule gather_shards:
        """Concatenate the shards, in order, into the single activation store (copied in blocks; no GPU)."""
        input:
            shards=get_extraction_shards,
        output:
            store="results/activations/{model}/{corpus}.h5",
        log:
            "logs/activations/{model}/{corpus}.log",
        priority: 1
        conda:
            ENV
        params:
            provenance=get_extraction_provenance,
        script:
            "../scripts/gather_shards.py"


rule plot_store_norms:
    """Mean residual norm by layer and register: a first look at a store (and a check it is sane)."""
    input:
        store="results/activations/{model}/{corpus}.h5",
    output:
        **figure_outputs(
            "results/figures/activations/{model}.{corpus}",
            ["norms"],
            "store",
            "Activation store",
            {"model": "{model}", "corpus": "{corpus}"},
        ),
        table="results/activations/{model}/{corpus}.norms.parquet",
    log:
        "logs/figures/{model}.{corpus}.norms.log",
    conda:
        ENV
    script:
        "../scripts/plot_store_norms.py"
