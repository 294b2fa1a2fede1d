"""Figures of the lens family: per-layer curves, one line per lens."""

import os

import matplotlib.pyplot as plt
import polars as pl
import seaborn as sns

from latent_atlas.addresses import resid_address
from latent_atlas.plots import PALETTE, apply_style, draw_interval, save_figure

LENS_ORDER = (
    "logit",
    "tuned",
    "patchscope_identity",
    "semantic_basis",
    "inverse_embedding_transpose",
    "inverse_embedding_pinv",
)
COLOURS = dict(zip(LENS_ORDER, sns.color_palette(PALETTE, n_colors=len(LENS_ORDER)), strict=True))  # one per reader
PANELS = (
    ("kl_to_final", "KL(p_final ‖ p_reader) [nats]", "symlog"),
    ("ce_next_token", "cross-entropy to next token [nats]", "log"),
    ("top1_agreement", "top-1 agreement with final (Precision@1)", "linear"),
    ("surprisal", "surprisal −log p_final(reader's top-1) [nats]", "log"),  # > 0: p_final < 1
)


def _lines(axis: plt.Axes, data: pl.DataFrame, metric: str, legend: bool) -> None:
    """Draw one metric by layer, one line per lens in a fixed lens order, with its interval as a band."""
    subset = data.filter(pl.col("metric") == metric)
    order = [lens for lens in LENS_ORDER if lens in set(subset["lens"])]
    style = {"hue_order": order, "palette": COLOURS, "marker": "o"}
    sns.lineplot(data=subset.to_pandas(), x="layer", y="value", hue="lens", ax=axis, legend=legend, **style)
    if "ci_low" not in subset.columns:
        return
    for lens in order:
        rows = subset.filter(pl.col("lens") == lens).sort("layer")
        draw_interval(axis, rows["layer"], rows["ci_low"], rows["ci_high"], COLOURS[lens])


def _band_note(table: pl.DataFrame) -> str:
    """'bands: 95 % bootstrap over N held-out documents', or '' when the table has no document intervals."""
    with_unit = table.filter(pl.col("unit") == "document") if "unit" in table.columns else table.clear()
    documents = int(with_unit["n"].max()) if with_unit.height else 0  # the median rank's n counts tokens
    return f"bands: 95 % bootstrap over {documents} held-out documents" if documents else ""


def plot_lens_comparison(
    table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str
) -> None:
    """KL to the final distribution, next-token CE, top-1 agreement and surprisal by layer, per reader.

    Scale-free lenses are drawn at their fitted temperatures (the table's ``temperature`` column).
    """
    apply_style()
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    for index, (axis, (metric, label, scale)) in enumerate(zip(axes.flat, PANELS, strict=True)):
        _lines(axis, table, metric, legend=index == 0)
        axis.set(xlabel="layer (resid.LL)", ylabel=label)
        if scale == "symlog":  # KL is 0 at the last layer for the logit and tuned lenses: keep it on the axis
            axis.set_yscale("symlog", linthresh=1e-2)
            axis.set_ylim(bottom=0)
        else:
            axis.set_yscale(scale)
    sns.move_legend(axes[0, 0], "upper left", bbox_to_anchor=(0, -1.37), ncol=3, frameon=False, title=None)
    band = f"; {note}" if (note := _band_note(table)) else ""
    figure.suptitle(
        f"Vocabulary lenses and the identity patchscope by layer — {title}\n"
        f"semantic-basis and inverse-embedding lenses at one temperature per layer, fitted on training tokens{band}"
    )
    save_figure(figure, pdf, png, f"{table['model'][0]} · {table['corpus'][0]} · {table['split'][0]}")


def plot_lens_agreement(
    table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str
) -> None:
    """Top-1 agreement of every lens with the ordinary logit lens, by layer (semantic bases vs logits).

    Where the table carries ``ci_low``/``ci_high`` (the document bootstrap of
    :func:`latent_atlas.lenses.evaluate.curves_from_documents`), each line has its interval as a band.
    """
    apply_style()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    agreement = table.filter(pl.col("lens") != "logit", pl.col("metric") == "agreement_with_logit")
    _lines(axis, agreement, "agreement_with_logit", legend=True)
    axis.set(xlabel="layer (resid.LL)", ylabel="top-1 agreement with the logit lens", ylim=(-0.02, 1.02))
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title=None)
    note = _band_note(agreement)
    figure.suptitle(f"Agreement with ordinary logits — {title}" + (f"\n{note}" if note else ""))
    save_figure(figure, pdf, png, f"{table['model'][0]} · {table['corpus'][0]} · {table['split'][0]}")


def plot_token_grid(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """One heat map per lens: layers (rows) x positions (columns), top token written in, probability as colour."""
    apply_style()
    lenses = [lens for lens in LENS_ORDER if lens in set(table["lens"])]
    n_positions = table["position"].max() + 1
    n_layers = table["layer"].n_unique()
    figure, axes = plt.subplots(
        1, len(lenses), figsize=(max(6, 0.9 * n_positions) * len(lenses), 0.42 * n_layers + 2), squeeze=False
    )
    for axis, lens in zip(axes[0], lenses, strict=True):
        data = table.filter(pl.col("lens") == lens).sort("layer", descending=True)
        probability = data.pivot(on="position", index="layer", values="probability").drop("layer")
        labels = data.pivot(on="position", index="layer", values="top_token").drop("layer")
        layers = data["layer"].unique(maintain_order=True).to_list()
        sns.heatmap(
            probability.to_numpy(),
            annot=[[repr(token)[1:-1][:8] for token in row] for row in labels.rows()],
            fmt="",
            annot_kws={"fontsize": 6},
            cmap="Blues",
            vmin=0,
            vmax=1,
            cbar=axis is axes[0][-1],
            cbar_kws={"label": "probability of the top token"},
            ax=axis,
        )
        inputs = data.filter(pl.col("layer") == layers[0]).sort("position")["input_token"].to_list()
        axis.set_xticks([i + 0.5 for i in range(len(inputs))], [repr(t)[1:-1] for t in inputs], rotation=45, ha="right")
        axis.set_yticks([i + 0.5 for i in range(len(layers))], [resid_address(layer) for layer in layers], rotation=0)
        axis.set(title=f"{lens} lens", xlabel="input token (the lens predicts the next one)", ylabel="")
    figure.suptitle(f"Top token by layer and position — {title}")
    save_figure(figure, pdf, png, title)
