"""Figures: one function per figure family, a shared seaborn style, PDF and PNG written atomically."""

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import seaborn as sns

from latent_atlas.provenance import atomic_output, code_version

PALETTE = "colorblind"


def apply_style() -> None:
    """Set the shared figure style."""
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)


def save_figure(figure: plt.Figure, pdf: str | os.PathLike[str], png: str | os.PathLike[str], stamp: str) -> None:
    """Save a figure as PDF and PNG (300 dpi), stamped with its provenance, each written atomically."""
    figure.text(0.995, 0.995, f"{stamp} · latent-atlas {code_version()}", ha="right", va="top", fontsize=6, color="0.5")
    for path, kind in ((pdf, "pdf"), (png, "png")):
        with atomic_output(path) as tmp:
            figure.savefig(tmp, format=kind, dpi=300, bbox_inches="tight")
    plt.close(figure)
