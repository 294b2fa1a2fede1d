"""Figures that describe an activation store."""

import os

import matplotlib.pyplot as plt
import polars as pl
import seaborn as sns

from latent_atlas.plots import apply_style, save_figure


def plot_layer_norms(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Plot mean residual norm by layer, one line per label; position 0 and later positions side by side.

    Args:
        table: the output of :func:`latent_atlas.summaries.layer_norms`.
        pdf: output PDF path.
        png: output PNG path.
        title: figure title (model and corpus).
    """
    apply_style()
    resid = table.filter(pl.col("layer").is_not_null()).with_columns(pl.col("label").fill_null("(none)"))
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    panels = (("rest", "positions ≥ 1"), ("first", "position 0 (attention sink)"))
    for axis, (group, label) in zip(axes, panels, strict=True):
        data = resid.filter(pl.col("position") == group).to_pandas()
        if data.empty:
            axis.set_axis_off()
            continue
        sns.lineplot(
            data=data, x="layer", y="mean_norm", hue="label", marker="o", markersize=3, ax=axis, legend=axis is axes[0]
        )
        axis.set(title=label, xlabel="layer (resid.LL; 0 = embeddings)", ylabel="mean ‖h‖₂", yscale="log")
    if axes[0].get_legend() is not None:
        sns.move_legend(axes[0], "upper left", bbox_to_anchor=(0, -0.22), ncol=4, frameon=False, title=None)
    figure.suptitle(f"Residual-stream norm by layer — {title}")
    stamp = f"{table['model'][0]} · {table['corpus'][0]}"
    save_figure(figure, pdf, png, stamp)
