# The training family (config key `training`): corpus -> tokenizer -> members -> performance, space, figures.
# Each member is saved as results/models/{member}/ like any acquired model, so the extraction, lens and
# geometry rules treat it as they treat SmolLM2.
if FAMILY:

    rule assemble_training_corpus:
        """Register-labelled training documents (Debian packages offline, or a hub dataset + classifier)."""
        input:
            sources=debian_sources(),
        output:
            corpus=f"results/training/{FAMILY}/corpus.parquet",
            manifest=f"results/training/{FAMILY}/corpus.json",
        log:
            f"logs/training/{FAMILY}/corpus.log",
        conda:
            ENV
        threads: 1
        resources:
            gpu=1 if config["training"]["corpus"]["source"] == "hub" else 0,
        params:
            corpus=config["training"]["corpus"],
            registers=config["training"]["registers"],
            downloads=str(Path(config["paths"]["resources"]) / "training-corpus"),
        script:
            "../scripts/assemble_training_corpus.py"

    rule prepare_training_tokens:
        """Train the family's tokenizer (or reuse a model's) and tokenize every split of every register."""
        input:
            unpack(get_tokenizer_source),
            corpus=f"results/training/{FAMILY}/corpus.parquet",
        output:
            tokenizer=directory(f"results/training/{FAMILY}/tokenizer"),
            tokens=f"results/training/{FAMILY}/tokens.npz",
        log:
            f"logs/training/{FAMILY}/tokens.log",
        conda:
            ENV
        threads: 1
        params:
            training=config["training"],
        script:
            "../scripts/prepare_training_tokens.py"

    rule train_member:
        """Train one member from scratch (resumes from its last checkpoint after a kill)."""
        input:
            corpus=f"results/training/{FAMILY}/corpus.parquet",
            tokenizer=f"results/training/{FAMILY}/tokenizer",
            tokens=f"results/training/{FAMILY}/tokens.npz",
        output:
            manifest="results/models/{model}/manifest.json",
            losses=f"results/training/{FAMILY}/losses/{{model}}.parquet",
        log:
            f"logs/training/{FAMILY}/{{model}}.log",
        wildcard_constraints:
            model=_alternatives(MEMBERS),
        conda:
            ENV
        threads: config["training"]["threads"]
        resources:
            gpu=1,
            mem_mb=memory_per_attempt(1000),  # grows on each retry; resumes from its last checkpoint
        params:
            spec=get_model_spec,
            training=config["training"],
            checkpoints=lambda wildcards: f"results/training/{FAMILY}/checkpoints/{wildcards.model}",
            device=config["training"]["device"],
        script:
            "../scripts/train_member.py"

    rule evaluate_on_training_corpus:
        """Perplexity and bits-per-byte of a member (or pretrained model) on each register's test split, and
        per document (the unit the family's intervals resample)."""
        input:
            manifest="results/models/{model}/manifest.json",
            corpus=f"results/training/{FAMILY}/corpus.parquet",
        output:
            table=f"results/training/{FAMILY}/performance/{{model}}.parquet",
            documents=f"results/training/{FAMILY}/documents/{{model}}.parquet",
        log:
            f"logs/training/{FAMILY}/performance/{{model}}.log",
        conda:
            ENV
        threads: model_threads(8)
        resources:
            gpu=1,
            mem_mb=memory_per_attempt(4000),  # grows on each retry (workflow/profiles)
        params:
            settings=config["training"]["evaluation"],
            registers=config["training"]["registers"],
        script:
            "../scripts/evaluate_on_training_corpus.py"

    rule summarise_family:
        """The family's tables: performance matrix, specialisation check, geometry, lenses, losses, relations;
        document-bootstrap intervals on performance and specialisation, point-bootstrap ones on relations.
        """
        input:
            unpack(get_family_tables),
            documents=lambda wildcards: [
                f"results/training/{FAMILY}/documents/{model}.parquet"
                for model in family_scored_models()
            ],
        output:
            performance=f"results/training/{FAMILY}/performance.parquet",
            documents=f"results/training/{FAMILY}/documents.parquet",
            specialisation=f"results/training/{FAMILY}/specialisation.parquet",
            relations=f"results/training/{FAMILY}/relations.parquet",
            geometry=f"results/training/{FAMILY}/geometry.parquet",
            lenses=f"results/training/{FAMILY}/lenses.parquet",
            losses=f"results/training/{FAMILY}/losses.parquet",
        log:
            f"logs/training/{FAMILY}/summary.log",
        conda:
            ENV
        params:
            mixtures={name: mixture.normalised() for name, mixture in MEMBERS.items()},
            training=config["training"],
        script:
            "../scripts/summarise_family.py"

    rule plot_family:
        """The family's figures: performance heat-map, training curves, geometry and lenses by depth, relations."""
        input:
            performance=f"results/training/{FAMILY}/performance.parquet",
            relations=f"results/training/{FAMILY}/relations.parquet",
            geometry=f"results/training/{FAMILY}/geometry.parquet",
            lenses=f"results/training/{FAMILY}/lenses.parquet",
            losses=f"results/training/{FAMILY}/losses.parquet",
        output:
            **figure_outputs(
                f"results/figures/training/{FAMILY}",
                TRAINING_FIGURES,
                "training",
                "Training family",
                {"family": FAMILY},
            ),
        log:
            f"logs/figures/training/{FAMILY}.log",
        conda:
            ENV
        params:
            family=FAMILY,
        script:
            "../scripts/plot_family.py"
