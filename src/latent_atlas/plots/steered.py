"""Where steered continuations' states sit by strength: distance to the data and what the lenses read there."""

import os

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns

from latent_atlas.addresses import resid_address
from latent_atlas.names import GENERATION_METHODS
from latent_atlas.plots import apply_style, draw_interval, save_figure

PANELS = (
    ("distance_ratio", "distance to nearest stored state\n÷ local spacing of the data"),
    ("agrees", "lens top-1 = model's next token"),
)
LENS_STYLES = {"logit": "-", "tuned": "--"}


def _methods(summary: pl.DataFrame) -> list[str]:
    present = set(summary["method"])
    return [m for m in GENERATION_METHODS if m in present] + sorted(present - set(GENERATION_METHODS))


def _line(axis: plt.Axes, rows: pl.DataFrame, colour: object, style: str, label: str) -> None:
    rows = rows.sort("coefficient")
    x = rows["coefficient"].to_numpy()
    axis.plot(x, rows["estimate"].to_numpy(), style, marker="o", markersize=3, color=colour, label=label)
    draw_interval(axis, x, rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy(), colour)


def plot_steered_states(
    summary: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], stamp: str
) -> None:
    """One column per method (its first steered layer, greedy decoding first), strength on x.

    Top: mean distance ratio per captured layer (colour), 1 = as far as stored states are from each other.
    Bottom: how often each lens's top-1 (logit solid, tuned dashed) is the model's own next token. Bands: 95%
    intervals resampling prompts.
    """
    apply_style()
    methods = _methods(summary)
    layers = sorted(set(summary["layer"]))
    colours = dict(zip(layers, sns.color_palette(n_colors=max(len(layers), 1)), strict=False))
    figure, axes = plt.subplots(
        len(PANELS), len(methods), figsize=(3.4 * len(methods), 5.6), squeeze=False, sharey="row"
    )
    for column, method in enumerate(methods):
        rows = summary.filter(pl.col("method") == method)
        steered = min(rows["steered_layer"])
        decoding = "greedy" if "greedy" in set(rows["decoding"]) else sorted(set(rows["decoding"]))[0]
        rows = rows.filter(pl.col("steered_layer") == steered, pl.col("decoding") == decoding)
        where = "every block" if method == "icv" else resid_address(steered)
        axes[0, column].set_title(f"{method} ({where}, {decoding})")
        for layer in layers:
            at = rows.filter(pl.col("layer") == layer)
            _line(axes[0, column], at.filter(pl.col("value") == "distance_ratio"), colours[layer], "-",
                  resid_address(layer))  # fmt: skip
            for lens, style in LENS_STYLES.items():
                agree = at.filter(pl.col("value") == f"{lens}_agrees")
                if agree.height:
                    _line(axes[1, column], agree, colours[layer], style, f"{lens} · {resid_address(layer)}")
        axes[0, column].axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        axes[1, column].set_xlabel("strength (coefficient)")
        axes[1, column].set_ylim(-0.05, 1.05)
    for row, (_, label) in enumerate(PANELS):
        axes[row, 0].set_ylabel(label)
    for row in range(len(PANELS)):
        handles, labels = axes[row, -1].get_legend_handles_labels()
        if handles:
            axes[row, -1].legend(handles, labels, fontsize=7, loc="best")
    if not np.isfinite(summary["ci_low"].to_numpy()).any():
        figure.text(0.5, 0.005, "fewer than 3 prompts: no interval", ha="center", fontsize=7, color="0.4")
    figure.tight_layout()
    save_figure(figure, pdf, png, stamp)
