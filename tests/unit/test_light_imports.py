"""The figure and summary jobs import no torch: each is a process of its own, and torch alone costs ~1 s to import."""

import subprocess
import sys

# What scripts/plot_*.py, summarise_*.py, relate_geometry.py and decide_claims.py import from the library.
LIGHT_MODULES = (
    "latent_atlas.claims",
    "latent_atlas.claims.report",
    "latent_atlas.plots.claims",
    "latent_atlas.plots.geometry",
    "latent_atlas.plots.lenses",
    "latent_atlas.plots.neighbourhood",
    "latent_atlas.plots.projections",
    "latent_atlas.plots.readers",
    "latent_atlas.plots.steering",
    "latent_atlas.plots.store",
    "latent_atlas.plots.training",
    "latent_atlas.geometry.relations",
    "latent_atlas.neighbourhood.stability",
    "latent_atlas.steering.summary",
    "latent_atlas.summaries",
    "latent_atlas.training.evaluate",
)


def test_figure_and_summary_modules_import_no_torch() -> None:
    code = (
        f"import importlib, sys\nfor name in {LIGHT_MODULES!r}:\n    importlib.import_module(name)\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\nassert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
