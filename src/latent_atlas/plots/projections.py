"""Figure of the parameter projections: Dar et al.'s aligned-vs-shuffled recall by layer."""

import os

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns

from latent_atlas.plots import apply_style, draw_interval, save_figure

TARGETS = (("layer", "the block's own output N_f(x^l) E"), ("final", "the model's prediction N_f(x^L) E"))


def plot_projection_recall(
    table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str
) -> None:
    """Grouped bars per block: recall of each kind's activated neurons, aligned (solid) vs shuffled (pale).

    Whiskers are 95 % percentile bootstrap intervals over documents (positions of one document are resampled
    together); one panel per target.
    """
    apply_style()
    kinds = list(dict.fromkeys(table["kind"].to_list()))
    layers = sorted(set(table["layer"].to_list()))
    colours = sns.color_palette(n_colors=len(kinds))
    figure, axes = plt.subplots(
        1, len(TARGETS), figsize=(5 + 1.2 * len(layers), 4.2), sharey=True, layout="constrained"
    )
    width = 0.8 / (2 * len(kinds))
    for axis, (target, label) in zip(axes, TARGETS, strict=True):
        for index, kind in enumerate(kinds):
            rows = table.filter((pl.col("target") == target) & (pl.col("kind") == kind)).sort("layer")
            centre = np.arange(len(layers)) + (2 * index + 0.5 - len(kinds)) * width
            for offset, column, alpha in ((0, "aligned", 1.0), (width, "shuffled", 0.35)):
                values = rows[column].to_numpy()
                axis.bar(centre + offset, values, width, color=colours[index], alpha=alpha, label=f"{kind} · {column}")
                low, high = rows[f"{column}_ci_low"].to_numpy(), rows[f"{column}_ci_high"].to_numpy()
                draw_interval(axis, centre + offset, low, high, "0.2", kind="bars", estimate=values)
        axis.set(xticks=np.arange(len(layers)), xticklabels=[str(layer) for layer in layers], xlabel="block l")
        axis.set_title(f"target: {label}", fontsize=9)
    axes[0].set_ylabel(f"recall of the state's top-{table['k'][0]} tokens")
    axes[0].legend(loc="upper left", bbox_to_anchor=(0, -0.18), ncol=len(kinds), frameon=False, fontsize=7)
    figure.suptitle(
        f"Dar et al.'s recall check — {title}\n"
        f"top-{table['neurons'][0]} neurons per position, n = {table['positions'][0]} positions "
        f"from {table['documents'][0]} documents; bars: 95 % bootstrap over documents",
        fontsize=10,
        x=0.01,
        ha="left",  # the provenance stamp takes the top right corner
    )
    save_figure(figure, pdf, png, f"{title} · n = {table['positions'][0]}")
