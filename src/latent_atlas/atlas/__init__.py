"""The atlas: one self-contained HTML page per model x corpus to explore what each token's state means.

``data`` computes everything the page shows from the store (lens readings, norms, exact neighbours, steered
continuations) as plain JSON-ready dicts; ``page`` writes them into one HTML file with its script and style
inlined (no server, no network). This module stays light (no torch): the workflow imports :func:`inputs` at
parse time.
"""

from collections.abc import Mapping
from typing import Any

GENERATION_METHODS = ("actadd", "mean_difference", "icv")


def _analysis_models(config: Mapping[str, Any], section: str) -> list[str]:
    """The models an analysis runs on: its own ``models`` key, else ``run.models``."""
    models = config.get(section, {}).get("models")
    return list(config["run"]["models"] if models is None else models)


def inputs(config: Mapping[str, Any], model: str, corpus: str) -> dict[str, str]:
    """What the atlas of one model x corpus reads: the model and store, and its tuned lens and steering tables.

    The last two only where those analyses run for the model; the page leaves out what is absent.
    """
    paths = {
        "manifest": f"results/models/{model}/manifest.json",
        "store": f"results/activations/{model}/{corpus}.h5",
    }
    if model in _analysis_models(config, "lenses"):
        paths["tuned"] = f"results/lenses/{model}/{corpus}.tuned-lens.pt"
    if model in _analysis_models(config, "steering"):
        for method in config.get("steering", {}).get("methods", []):
            if method in GENERATION_METHODS:
                paths[f"steering_{method}"] = f"results/steering/{model}/{method}.parquet"
    return paths


def outputs(config: Mapping[str, Any]) -> list[str]:
    """The atlas pages of the default run: every atlas model on every corpus of run.corpora."""
    return [
        f"results/atlas/{model}.{corpus}.html"
        for model in _analysis_models(config, "atlas")
        for corpus in config["run"]["corpora"]
    ]
