# Configuration validation and input functions. Other rule files hold rules only.
# Light imports only: a dry run must stay fast (no torch at parse time).
import re
from pathlib import Path

from latent_atlas.config import load_yaml, validate_config
from latent_atlas.provenance import config_hash

SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
validate_config(
    config, load_yaml(SCHEMA), source="the config (config/*.yaml and --config)"
)

ENV = "../environment.yml"


def _alternatives(names):
    """A wildcard constraint that matches exactly the given names."""
    return "|".join(re.escape(name) for name in names)


wildcard_constraints:
    model=_alternatives(config["models"]),
    corpus=_alternatives(config["corpora"]),
    probe=_alternatives(config["probes"]) or "(?!)",


def get_final_output():
    """Every target of the default run: stores, lens tables and their figures for each (model, corpus)."""
    models, corpora = config["run"]["models"], config["run"]["corpora"]
    stores = expand(
        "results/activations/{model}/{corpus}.h5", model=models, corpus=corpora
    )
    figures = expand(
        "results/figures/activations/{model}.{corpus}.norms.{ext}",
        model=models,
        corpus=corpora,
        ext=["pdf", "png"],
    )
    lens_figures = expand(
        "results/figures/lenses/{model}.{corpus}.{figure}.{ext}",
        model=models,
        corpus=corpora,
        figure=["curves", "agreement", "grid"],
        ext=["pdf", "png"],
    )
    probe_names = config["run"].get("probes", list(config["probes"]))
    probes = expand(
        "results/probes/{model}/{probe}.json", model=models, probe=probe_names
    )
    projections = expand(
        "results/projections/{model}/{table}.parquet",
        model=models,
        table=["mlp", "heads", "alignment"],
    )
    return stores + figures + lens_figures + probes + projections


def get_model_spec(wildcards):
    """The config entry of a model."""
    return config["models"][wildcards.model]


def get_corpus_spec(wildcards):
    """The config entry of a corpus."""
    return config["corpora"][wildcards.corpus]


def get_corpus_source(wildcards):
    """The corpus file on disk, so that editing it re-runs preparation (none for hub datasets)."""
    spec = config["corpora"][wildcards.corpus]
    return [] if spec["format"] == "hf" else [spec["path"]]


def get_extraction_provenance(wildcards):
    """What the store's config_hash covers: the model, the corpus and the extraction settings."""
    fragment = {
        "model": config["models"][wildcards.model],
        "corpus": config["corpora"][wildcards.corpus],
        "extraction": config["extraction"],
    }
    return {
        "model": wildcards.model,
        "corpus": wildcards.corpus,
        "config_hash": config_hash(fragment),
    }


def get_probe_inputs(wildcards):
    """A probe reads the model, the tuned lens of the first corpus in run, and its saved vectors if any."""
    tuned_corpus = config["run"]["corpora"][0]
    inputs = {
        "manifest": f"results/models/{wildcards.model}/manifest.json",
        "tuned": f"results/lenses/{wildcards.model}/{tuned_corpus}.tuned-lens.pt",
    }
    vectors = [spec["vector"] for spec in config["probes"].values() if "vector" in spec]
    return inputs | {f"vector_{i}": path for i, path in enumerate(vectors)}


def get_grid_inputs(wildcards):
    """The token grid reads the model and the tuned lens trained on this corpus."""
    return {
        "manifest": f"results/models/{wildcards.model}/manifest.json",
        "tuned": f"results/lenses/{wildcards.model}/{wildcards.corpus}.tuned-lens.pt",
    }
