"""Figures: one function per figure family, a shared seaborn style, PDF and PNG written atomically."""

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
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


def draw_interval(
    axis: plt.Axes,
    x: Sequence[float] | np.ndarray,
    low: Sequence[float] | np.ndarray,
    high: Sequence[float] | np.ndarray,
    colour: object,
    *,
    kind: str = "band",
    estimate: Sequence[float] | np.ndarray | None = None,
    horizontal: bool = False,
) -> None:
    """Draw a 95% interval: a shaded band along a line, or error bars around ``estimate`` (``kind="bars"``).

    ``horizontal`` (bars only): the interval is of the x value ``estimate`` at height ``x``.

    NaN bounds (fewer units than a bootstrap needs) draw nothing, so a missing interval stays visibly missing.
    """
    x, low, high = (np.asarray(values, dtype=np.float64) for values in (x, low, high))
    finite = np.isfinite(low) & np.isfinite(high)
    if not finite.any():
        return
    if kind == "band":
        axis.fill_between(x, np.where(finite, low, np.nan), np.where(finite, high, np.nan), color=colour,
                          alpha=0.2, linewidth=0)  # fmt: skip
    elif kind == "bars":
        if estimate is None:
            raise ValueError("draw_interval(kind='bars') needs the estimate the bars surround")
        centre = np.asarray(estimate, dtype=np.float64)
        below, above = np.clip(centre - low, 0, None), np.clip(high - centre, 0, None)
        spread = {"xerr" if horizontal else "yerr": [below[finite], above[finite]]}
        at = (centre[finite], x[finite]) if horizontal else (x[finite], centre[finite])
        axis.errorbar(*at, **spread, fmt="none", ecolor=colour, elinewidth=1, capsize=2)
    else:
        raise ValueError(f"draw_interval: kind must be 'band' or 'bars', got {kind!r}")
