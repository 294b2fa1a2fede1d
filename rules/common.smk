# Configuration validation, then the input functions in sections by analysis, in the order the Snakefile
# includes the rule files (which hold rules only).
# Light imports only: a dry run must stay fast (no torch at parse time).
import re
from pathlib import Path

from latent_atlas.claims import inputs as claims_inputs
from latent_atlas.config import (
    ConfigSources,
    analysis_models,
    elm_judge,
    load_yaml,
    validate_config,
)
from latent_atlas.corpus import resolve_corpus_spec
from latent_atlas.names import (
    ELM_FIGURES,
    FIGURE_FORMATS,
    GENERATION_FIGURES,
    GENERATION_METHODS,
    GEOMETRY_CORPUS_FIGURES,
    GEOMETRY_MODEL_FIGURES,
    LENS_FIGURES,
    NEIGHBOURHOOD_POINT_FIGURES,
    STEERING_METHODS,
    TRAINING_FIGURES,
)
from latent_atlas.provenance import config_hash
from latent_atlas.training.family import family_name, member_spec, members

SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
# Messages name the file that set a bad key; layers are checked against each acquired model's depth.
validate_config(
    config,
    load_yaml(SCHEMA),
    sources=ConfigSources.of_workflow(workflow),
    models_root="results/models",
)


# ---- shared: environment, family members, wildcards, default targets, figures, per-model resources ---------


ENV = "../environment.yml"
# The training family (config key `training`): its name and its members (member name -> mixture).
FAMILY = family_name(config)
MEMBERS = members(config)
# The reader tasks (readers.tasks): a wildcard, so named here; the readers' section uses them too.
READER_TASKS = list(config["readers"]["tasks"])


def _alternatives(names):
    """A wildcard constraint that matches exactly the given names."""
    return "|".join(re.escape(name) for name in names)


wildcard_constraints:
    model=_alternatives([*config["models"], *MEMBERS]),
    corpus=_alternatives(config["corpora"]),
    probe=_alternatives(config["probes"]) or "(?!)",
    point=_alternatives(config["neighbourhood"]["points"]) or "(?!)",
    path=_alternatives(config["neighbourhood"]["paths"]) or "(?!)",
    method=_alternatives(GENERATION_METHODS),
    task=_alternatives(READER_TASKS) or "(?!)",


def get_final_output():
    """Every target of the default run.

    For each model of run.models and each corpus: the store and its norms figure, geometry and performance;
    for each analysis's own models: lens tables and figures, probes, projections, neighbourhoods, steering.
    """
    models, corpora = config["run"]["models"], config["run"]["corpora"]
    stores = expand(
        "results/activations/{model}/{corpus}.h5", model=models, corpus=corpora
    )
    figures = expand(
        "results/figures/activations/{model}.{corpus}.norms.{ext}",
        model=models,
        corpus=corpora,
        ext=FIGURE_FORMATS,
    )
    lens_models = analysis_models(config, "lenses")
    lens_figures = expand(
        "results/figures/lenses/{model}.{corpus}.{figure}.{ext}",
        model=lens_models,
        corpus=corpora,
        figure=LENS_FIGURES,
        ext=FIGURE_FORMATS,
    )
    probe_names = config["run"].get("probes", list(config["probes"]))
    probes = expand(
        "results/probes/{model}/{probe}.json", model=lens_models, probe=probe_names
    )
    projections = expand(
        "results/projections/{model}/{table}.parquet",
        model=analysis_models(config, "projections"),
        table=["mlp", "heads", "alignment", "recall"],
    ) + expand(
        "results/figures/projections/{model}.recall.{ext}",
        model=analysis_models(config, "projections"),
        ext=FIGURE_FORMATS,
    )
    return (
        stores
        + figures
        + lens_figures
        + probes
        + projections
        + get_neighbourhood_output(analysis_models(config, "neighbourhood"), corpora)
        + get_steering_output(analysis_models(config, "steering"))
        + get_geometry_output(models, corpora)
        + get_training_output()
        + get_reader_output(analysis_models(config, "readers"))
        + get_claims_output(models, corpora)
        + atlas_outputs(config)  # rules/atlas.smk imports it
    )


def figure_outputs(
    stem, figures, caption_stem, category, labels, shown=None, captions=None
):
    """The PDF and PNG of each figure of a plotting rule, named and with its report entry: how every figure is declared.

    Figure `f` is `{stem}.{f}.{ext}`, named `{f}_{ext}` (hyphens as underscores), with the report caption
    workflow/report/{caption_stem}_{f}.rst (`captions[f]` in place of `f` where given), the rule's category
    and labels, and the label `figure`: `f` (or `shown[f]`), with " (pdf)" on the PDF.
    """
    shown, captions = shown or {}, captions or {}
    outputs = {}
    for figure in figures:
        caption = (
            f"../workflow/report/{caption_stem}_{captions.get(figure, figure)}.rst"
        )
        for ext in FIGURE_FORMATS:
            label = shown.get(figure, figure) + (" (pdf)" if ext == "pdf" else "")
            outputs[f"{figure.replace('-', '_')}_{ext}"] = report(
                f"{stem}.{figure}.{ext}",
                caption=caption,
                category=category,
                labels=labels | {"figure": label},
            )
    return outputs


def model_threads(threads):
    """Threads of a per-model job: 1 for a family member (tiny: members run side by side), else ``threads``."""
    return lambda wildcards: 1 if wildcards.model in MEMBERS else threads


def memory_per_attempt(mb, member_mb=1000):
    """`mem_mb` of an out-of-memory-prone per-model job: `mb` (`member_mb` for a tiny family member) x attempt.

    Locally, workflow/profiles/default caps the pool (`resources: mem_mb=...`) and retries once, so a retried
    job claims twice its share and fewer jobs run beside it (one asking more than the pool is given all of it).
    Sizes fit config/config.yaml; the SLURM profile's set-resources replace them with the full study's.
    """

    def mem_mb(wildcards, attempt):
        return (member_mb if wildcards.get("model") in MEMBERS else mb) * attempt

    return mem_mb


def with_member_layers(section):
    """A section's settings, with every layer for family members (they have only a few): extraction, lenses, geometry."""

    def settings(wildcards):
        if wildcards.model in MEMBERS:
            return config[section] | {"layers": "all"}
        return config[section]

    return settings


# ---- models (rules/models.smk) -----------------------------------------------------------------------------


def get_model_spec(wildcards):
    """The config entry of a model; a family member's is built from the training section."""
    if wildcards.model in MEMBERS:
        return member_spec(config, wildcards.model)
    return config["models"][wildcards.model]


# ---- corpora (rules/corpora.smk) ---------------------------------------------------------------------------


def get_corpus_spec(wildcards):
    """The config entry of a corpus (format training: with the family corpus's path)."""
    name = wildcards.corpus
    return resolve_corpus_spec(name, config["corpora"][name], config.get("training"))


def get_corpus_source(wildcards):
    """The corpus file on disk, so that editing it re-runs preparation (none for hub datasets).

    Format training reads results/training/{family}/corpus.parquet: assemble_training_corpus runs upstream.
    """
    spec = get_corpus_spec(wildcards)
    return [] if spec["format"] == "hf" else [spec["path"]]


# ---- activation stores, sharded extraction (rules/activations.smk) -----------------------------------------


# `extraction.shards` only splits the work over jobs: the store is the same, so it enters neither the
# extraction jobs' params nor the store's config_hash (setting it never re-extracts a store for a new hash).
SHARDS = config["extraction"]["shards"]


def extraction_settings(wildcards):
    """The extraction settings a store depends on: the section (every layer for members), less `shards`."""
    settings = with_member_layers("extraction")(wildcards)
    return {key: value for key, value in settings.items() if key != "shards"}


def get_extraction_provenance(wildcards):
    """What the store's config_hash covers: the model, the corpus and the extraction settings (not `shards`)."""
    fragment = {
        "model": get_model_spec(wildcards),
        "corpus": config["corpora"][wildcards.corpus],
        "extraction": extraction_settings(wildcards),
    }
    return {
        "model": wildcards.model,
        "corpus": wildcards.corpus,
        "config_hash": config_hash(fragment),
    }


def get_extraction_shards(wildcards):
    """The shards the gather job concatenates, shard 0 first."""
    return [
        f"results/activations/{wildcards.model}/{wildcards.corpus}.shards/{shard}.h5"
        for shard in range(SHARDS)
    ]


# ---- lenses, probes, projections (rules/lenses.smk) --------------------------------------------------------


def tuned_lens_settings(wildcards):
    """What train_tuned_lens reads: its layers, its recipe and the first-position rule, not the evaluation's keys."""
    settings = with_member_layers("lenses")(wildcards)
    return {key: settings[key] for key in ("layers", "tuned", "skip_first_position")}


def probe_closure(names):
    """The named probes and every probe their midpoints read: what a job that reads them depends on."""
    closure, pending = {}, list(names)
    while pending:
        name = pending.pop()
        if name not in closure:
            closure[name] = config["probes"][name]
            pending += closure[name].get("midpoint", [])
    return closure


def _vector_inputs(probes):
    """The saved-vector files among some probes, as named inputs."""
    vectors = [spec["vector"] for spec in probes.values() if "vector" in spec]
    return {f"vector_{i}": path for i, path in enumerate(vectors)}


def get_probe_inputs(wildcards):
    """A probe reads the model, the tuned lens of the first corpus in run, and its saved vectors if any."""
    tuned_corpus = config["run"]["corpora"][0]
    inputs = {
        "manifest": f"results/models/{wildcards.model}/manifest.json",
        "tuned": f"results/lenses/{wildcards.model}/{tuned_corpus}.tuned-lens.pt",
    }
    return inputs | _vector_inputs(probe_closure([wildcards.probe]))


def get_grid_inputs(wildcards):
    """The token grid reads the model and the tuned lens trained on this corpus."""
    return {
        "manifest": f"results/models/{wildcards.model}/manifest.json",
        "tuned": f"results/lenses/{wildcards.model}/{wildcards.corpus}.tuned-lens.pt",
    }


# ---- neighbourhoods, paths, steered states (rules/neighbourhood.smk) ---------------------------------------


# What a neighbourhood job depends on: its settings without the lists of points and paths (adding a point
# must not re-run the others), and the one lens setting it uses.
NEIGHBOURHOOD_SETTINGS = {
    key: value
    for key, value in config["neighbourhood"].items()
    if key not in ("points", "paths")
}
NEIGHBOURHOOD_LENSES = {"semantic_basis": config["lenses"]["semantic_basis"]}


def get_neighbourhood_output(models, corpora):
    """Tables and figures of every neighbourhood point and path, per (model, corpus)."""
    section = config["neighbourhood"]
    points = expand(
        "results/figures/neighbourhood/{model}.{corpus}.{point}.{figure}.{ext}",
        model=models,
        corpus=corpora,
        point=section["points"],
        figure=NEIGHBOURHOOD_POINT_FIGURES,
        ext=FIGURE_FORMATS,
    )
    paths = expand(
        "results/figures/neighbourhood/{model}.{corpus}.{path}.path.{ext}",
        model=models,
        corpus=corpora,
        path=list(section["paths"]),
        ext=FIGURE_FORMATS,
    )
    return points + paths + get_steered_states_output()


def neighbourhood_probes(wildcards):
    """The probes a neighbourhood job reads: its point, or the two ends of its path, with their midpoints."""
    if "point" in wildcards.keys():
        return probe_closure([wildcards.point])
    return probe_closure(config["neighbourhood"]["paths"][wildcards.path])


def get_neighbourhood_inputs(wildcards):
    """The model, the store and tuned lens of this corpus, and the saved vectors the probes read."""
    model, corpus = wildcards.model, wildcards.corpus
    inputs = {
        "manifest": f"results/models/{model}/manifest.json",
        "store": f"results/activations/{model}/{corpus}.h5",
        "tuned": f"results/lenses/{model}/{corpus}.tuned-lens.pt",
    }
    return inputs | _vector_inputs(neighbourhood_probes(wildcards))


def steered_methods():
    """The configured steering methods that generate (and so keep their tokens' states)."""
    return [m for m in config["steering"]["methods"] if m in GENERATION_METHODS]


def get_steered_states_output():
    """Where steered continuations' states sit: table, summary and figure per steering model (steering's store)."""
    if not steered_methods():
        return []
    wildcards = {
        "model": analysis_models(config, "steering"),
        "corpus": config["run"]["corpora"][0],
    }
    tables = expand(
        "results/neighbourhood/{model}/{corpus}/steered-states.parquet", **wildcards
    )
    figures = expand(
        "results/figures/neighbourhood/{model}.{corpus}.steered-states.{ext}",
        ext=FIGURE_FORMATS,
        **wildcards,
    )
    return tables + figures


def get_steered_states_inputs(wildcards):
    """The model, the store and tuned lens of the corpus, and every generation method's captured states."""
    model, corpus = wildcards.model, wildcards.corpus
    states = {
        method: f"results/steering/{model}/{method}.states.h5"
        for method in steered_methods()
    }
    inputs = states | {
        "manifest": f"results/models/{model}/manifest.json",
        "store": f"results/activations/{model}/{corpus}.h5",
    }
    if model in analysis_models(config, "lenses"):  # a tuned lens is trained for it
        inputs["tuned"] = f"results/lenses/{model}/{corpus}.tuned-lens.pt"
    return inputs


STEERED_STATES_SETTINGS = {
    key: config["neighbourhood"][key]
    for key in (
        "block_rows",
        "skip_first_position",
        "context_tokens",
        "steered_states",
        "seed",
    )
    if key in config["neighbourhood"]
}


# ---- steering (rules/steering.smk) -------------------------------------------------------------------------


def steering_settings(method):
    """What a steering job depends on: the shared steering keys and its own method's section only.

    Optimised vectors always run in float32 (gradients), so `model_dtype` is no part of their settings; the
    shared `prefix` is read by the generation methods only.
    """
    steering = config["steering"]
    unused = {"optimised": ["model_dtype", "prefix"], "iti": ["prefix"]}.get(method, [])
    shared = {
        key: value
        for key, value in steering.items()
        if key not in ["methods", *STEERING_METHODS, *unused]
    }
    return shared | {method: steering[method]}


def get_steering_output(models):
    """The steering tables of every configured method, and the steering figures."""
    methods = config["steering"]["methods"]
    if not methods:
        return []
    tables = expand(
        "results/steering/{model}/{method}.parquet", model=models, method=methods
    )
    tables += expand("results/steering/{model}/summary.parquet", model=models)
    figures = expand(
        "results/figures/steering/{model}.{figure}.{ext}",
        model=models,
        figure=steering_figures(),
        ext=FIGURE_FORMATS,
    )
    return tables + figures


def steering_figures():
    """The steering figures the configured methods allow."""
    methods = config["steering"]["methods"]
    figures = ["examples"]
    if set(methods) & set(GENERATION_METHODS):
        figures += GENERATION_FIGURES
    if "iti" in methods:
        figures.append("iti")
    return figures


def get_steering_inputs(wildcards):
    """A steering job reads the model, the steering data and a store (for the layers' typical norms)."""
    corpus = config["run"]["corpora"][0]
    return {
        "manifest": f"results/models/{wildcards.model}/manifest.json",
        "store": f"results/activations/{wildcards.model}/{corpus}.h5",
        "data": config["steering"]["data"],
    }


def get_steering_method_tables(wildcards):
    """The steering table of every configured method (what summarise_steering reads)."""
    return {
        method: f"results/steering/{wildcards.model}/{method}.parquet"
        for method in config["steering"]["methods"]
    }


def get_steering_tables(wildcards):
    """Every steering table the figures draw on, with the summary's intervals."""
    tables = get_steering_method_tables(wildcards)
    tables["summary"] = f"results/steering/{wildcards.model}/summary.parquet"
    if "iti" in config["steering"]["methods"]:
        tables["iti_probes"] = f"results/steering/{wildcards.model}/iti.probes.parquet"
    return tables


# ---- geometry and performance (rules/geometry.smk, rules/evaluation.smk) -----------------------------------


def get_geometry_output(models, corpora):
    """Geometry and performance tables per (model, corpus), their relations, and the geometry figures."""
    tables = expand(
        "results/geometry/{model}/{corpus}.parquet", model=models, corpus=corpora
    )
    readout = expand("results/geometry/{model}/readout.parquet", model=models)
    performance = expand(
        "results/evaluation/{model}/{corpus}.parquet", model=models, corpus=corpora
    )
    per_model = expand(
        "results/figures/geometry/{model}.{corpus}.{figure}.{ext}",
        model=models,
        corpus=corpora,
        figure=GEOMETRY_MODEL_FIGURES,
        ext=FIGURE_FORMATS,
    )
    across = expand(
        "results/figures/geometry/{corpus}.{figure}.{ext}",
        corpus=corpora,
        figure=GEOMETRY_CORPUS_FIGURES,
        ext=FIGURE_FORMATS,
    )
    relations = expand("results/geometry/{corpus}.relations.parquet", corpus=corpora)
    return tables + readout + performance + per_model + across + relations


def get_geometry_models(wildcards):
    """Geometry, readout and performance tables of every model of run.models on one corpus."""
    models = config["run"]["models"]
    corpus = wildcards.corpus
    return {
        "geometry": [f"results/geometry/{model}/{corpus}.parquet" for model in models],
        "readout": [f"results/geometry/{model}/readout.parquet" for model in models],
        "performance": [
            f"results/evaluation/{model}/{corpus}.parquet" for model in models
        ],
    } | (
        {"benchmarks": config["evaluation"]["benchmarks"]}
        if config["evaluation"]["benchmarks"]
        else {}
    )


# ---- the training family (rules/training.smk) --------------------------------------------------------------


def training_corpus():
    """The shared corpus every member's space is measured on."""
    return config["training"]["analysis"]["corpus"] or config["run"]["corpora"][0]


def family_scored_models():
    """Models scored on the training corpus's test split: the members, then the chosen pretrained models."""
    return [*MEMBERS, *config["training"]["evaluation"]["pretrained"]]


def family_lens_models():
    """Models whose lens tables the family figures compare: the members and the pretrained lens models."""
    return [*MEMBERS, *analysis_models(config, "lenses")]


def get_training_output():
    """The family's tables and figures (nothing when the config trains no family)."""
    if not FAMILY:
        return []
    tables = expand(
        f"results/training/{FAMILY}/{{table}}.parquet",
        table=["performance", "specialisation", "relations"],
    )
    figures = expand(
        f"results/figures/training/{FAMILY}.{{figure}}.{{ext}}",
        figure=TRAINING_FIGURES,
        ext=FIGURE_FORMATS,
    )
    return tables + figures


def get_family_tables(wildcards):
    """Every table the family summary combines."""
    corpus = training_corpus()
    studied = [*MEMBERS, *config["run"]["models"]]
    return {
        "performance": [
            f"results/training/{FAMILY}/performance/{model}.parquet"
            for model in family_scored_models()
        ],
        "losses": [
            f"results/training/{FAMILY}/losses/{model}.parquet" for model in MEMBERS
        ],
        "geometry": [f"results/geometry/{model}/{corpus}.parquet" for model in studied],
        "lenses": [
            f"results/lenses/{model}/{corpus}.parquet" for model in family_lens_models()
        ],
        "manifests": [f"results/models/{model}/manifest.json" for model in studied],
    }


def debian_sources():
    """The Debian sources file of the training corpus (so that editing it rebuilds the corpus)."""
    corpus = config["training"]["corpus"]
    return [corpus["sources"]] if corpus["source"] == "debian" else []


def get_tokenizer_source(wildcards):
    """The model directory whose tokenizer the family reuses (training.tokenizer.model), if any."""
    model = config["training"]["tokenizer"].get("model")
    return {"model": f"results/models/{model}/manifest.json"} if model else {}


# ---- learned readers (rules/readers.smk) -------------------------------------------------------------------


def clustering_tasks():
    """The tasks semantic clustering is compared on: readers.clustering.tasks, else every task."""
    chosen = config["readers"]["clustering"]["tasks"]
    return READER_TASKS if chosen is None else chosen


def clustering_settings():
    """What a comparison job depends on: the clustering section without its list of tasks (adding a task must
    not re-run the others)."""
    return {
        key: value
        for key, value in config["readers"]["clustering"].items()
        if key != "tasks"
    }


def elm_enabled():
    """Whether the ELM adapter is trained (it needs its task)."""
    return bool(config["readers"]["elm"]["enabled"] and READER_TASKS)


def reader_figures():
    """The readers' figures the configuration allows."""
    figures = ["clustering"] if clustering_tasks() else []
    return figures + (list(ELM_FIGURES) if elm_enabled() else [])


def get_reader_output(models):
    """The readers' tables and figures (nothing when no task is configured)."""
    if not reader_figures():
        return []
    return expand(
        "results/figures/readers/{model}.{figure}.{ext}",
        model=models,
        figure=reader_figures(),
        ext=FIGURE_FORMATS,
    )


def _task_inputs(model, task):
    """A task's model, store and prepared corpus."""
    corpus = config["readers"]["tasks"][task]["corpus"]
    return {
        "manifest": f"results/models/{model}/manifest.json",
        "store": f"results/activations/{model}/{corpus}.h5",
        "corpus": f"results/corpora/{corpus}.parquet",
    }


def get_reader_task_inputs(wildcards):
    """A clustering comparison reads the model, the task corpus's store and its texts."""
    return _task_inputs(wildcards.model, wildcards.task)


def get_elm_inputs(wildcards):
    """The ELM reads the model, and the store and texts of its task's corpus."""
    return _task_inputs(wildcards.model, config["readers"]["elm"]["task"])


def get_elm_judge(wildcards):
    """The judge model of semantic consistency, if one is configured."""
    judge = elm_judge(config["readers"]["elm"], wildcards.model)
    return {"judge": f"results/models/{judge}/manifest.json"} if judge else {}


# ELM keys that only evaluation reads (training ignores them), and the one only the figures read: changing
# them re-runs evaluate_elm or plot_readers, not the training.
ELM_EVALUATION_KEYS = ["judge", "judge_layer", "max_new_tokens", "path", "examples"]


def elm_settings(stage):
    """What an ELM job depends on: the elm section (without the keys it does not read), its task, the token limit."""
    unused = ELM_EVALUATION_KEYS if stage == "train" else ["examples"]

    def settings(wildcards):
        readers = config["readers"]
        elm = {k: v for k, v in readers["elm"].items() if k not in unused}
        return {
            "elm": elm,
            "task": readers["tasks"][readers["elm"]["task"]],
            "max_tokens": readers["max_tokens"],
        }

    return settings


def get_reader_tables(wildcards):
    """Every table the readers' figures draw on."""
    model = wildcards.model
    tables = {
        "clustering": [
            f"results/readers/{model}/clustering/{task}.parquet"
            for task in clustering_tasks()
        ]
    }
    if elm_enabled():
        tables |= {
            name: f"results/readers/{model}/elm/{name}.parquet"
            for name in ("losses", "evaluation", "paths")
        }
    return tables


# ---- claims (rules/claims.smk) -----------------------------------------------------------------------------


def get_claims_output(models, corpora):
    """The claims table, its report page and figure of every model of run.models on every corpus."""
    stems = expand("{model}.{corpus}", model=models, corpus=corpora)
    return (
        [f"results/claims/{stem}.parquet" for stem in stems]
        + [f"results/claims/{stem}.html" for stem in stems]
        + [
            f"results/figures/claims/{stem}.claims.{ext}"
            for stem in stems
            for ext in FIGURE_FORMATS
        ]
    )


CLAIMS_SECTIONS = [
    "lenses",
    "geometry",
    "evaluation",
    "steering",
    "readers",
    "training",
]


def claims_settings():
    """What the claims read of the config: the sections of the analyses they judge and run (without probes),
    so that a changed probe or neighbourhood point re-decides nothing."""
    run = {key: value for key, value in config["run"].items() if key != "probes"}
    return {"run": run} | {key: config[key] for key in CLAIMS_SECTIONS if key in config}


def get_claims_inputs(wildcards):
    """Every table the claims of one model x corpus read (latent_atlas.claims.inputs)."""
    return claims_inputs(config, wildcards.model, wildcards.corpus)
