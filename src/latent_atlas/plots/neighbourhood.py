"""Figures of a point's neighbourhood: stability curves, a PCA map, and interpolation strips."""

import os

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.gridspec import GridSpec

from latent_atlas.addresses import resid_address
from latent_atlas.neighbourhood.stability import stability_summary
from latent_atlas.plots import PALETTE, apply_style, draw_interval, save_figure

DECODER_ORDER = ("logit", "tuned", "semantic_basis", "inverse_embedding_transpose", "inverse_embedding_pinv", "model")
FAMILY_ORDER = ("isotropic", "local_pca", "rogue", "ordinary")
STABILITY_PANELS = (
    ("top1_retained", "top-1 retained", "linear"),
    ("jaccard_topk", "Jaccard of top-k with centre", "linear"),
    ("kl_to_reference", "KL(p_centre ‖ p) [nats]", "symlog"),
)
_TOKEN_COLOURS = 8
_LAYER_DASHES = ("-", "--", ":", "-.")


def _decoders(table: pl.DataFrame) -> list[str]:
    present = set(table["decoder"])
    return [decoder for decoder in DECODER_ORDER if decoder in present]


def _stamp(table: pl.DataFrame) -> str:
    return f"{table['model'][0]} · {table['corpus'][0]} · {table['point'][0]} · seed {table['seed'][0]}"


def _token_label(token: str) -> str:
    return repr(token)[1:-1][:10]


def _stability_lines(
    axis: plt.Axes, summary: pl.DataFrame, metric: str, colours: dict[str, object], dashes: dict[int, str]
) -> None:
    """One line per (family, layer) of ``metric`` against radius, with its 95 % interval over directions as a band."""
    for family, colour in colours.items():
        for layer, dash in dashes.items():
            rows = summary.filter(
                pl.col("metric") == metric, pl.col("family") == family, pl.col("layer") == layer
            ).sort("radius")
            if rows.is_empty():
                continue
            label = family if len(dashes) == 1 else f"{family} · {resid_address(layer)}"
            axis.plot(rows["radius"], rows["value"], color=colour, linestyle=dash, marker="o", markersize=3,
                      label=label)  # fmt: skip
            draw_interval(axis, rows["radius"], rows["ci_low"], rows["ci_high"], colour)


def _directions_text(summary: pl.DataFrame) -> str:
    """'16 directions per family' or '4–16 directions per family' (the model decoder reads fewer)."""
    low, high = int(summary["n"].min()), int(summary["n"].max())
    return f"{low} directions per family" if low == high else f"{low}–{high} directions per family"


def plot_stability(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Metric against radius, one line per direction family (and style per layer), one row per decoder.

    Each point is the mean over the family's sampled directions, its band the 95 % percentile bootstrap over
    those directions (:func:`latent_atlas.neighbourhood.pipeline.stability_summary`). The right-hand panel
    shows how far the samples are from real data: the distance to the nearest stored state, against the local
    spacing of the data (the median nearest-other distance among the centre's stored neighbours, dashed).
    """
    apply_style()
    samples = table.filter(pl.col("kind") == "sample")
    summary = stability_summary(samples)
    decoders = _decoders(samples)
    families = [family for family in FAMILY_ORDER if family in set(samples["family"])]
    colours = dict(zip(families, sns.color_palette(PALETTE, n_colors=len(families)), strict=True))
    dashes = {layer: _LAYER_DASHES[i % len(_LAYER_DASHES)] for i, layer in enumerate(sorted(set(samples["layer"])))}
    figure = plt.figure(figsize=(4.2 * (len(STABILITY_PANELS) + 1), 2.6 * len(decoders) + 0.8))
    grid = GridSpec(len(decoders), len(STABILITY_PANELS) + 1, figure=figure, hspace=0.45, wspace=0.3)
    for row, decoder in enumerate(decoders):
        data = summary.filter(pl.col("decoder") == decoder)
        for column, (metric, label, scale) in enumerate(STABILITY_PANELS):
            axis = figure.add_subplot(grid[row, column])
            _stability_lines(axis, data, metric, colours, dashes)
            axis.set(xlabel="radius / typical norm" if row == len(decoders) - 1 else "", ylabel=label)
            axis.set_title(f"{decoder} (n = {_directions_text(data)})", fontsize=9, loc="left")
            if scale == "symlog":
                axis.set_yscale("symlog", linthresh=1e-2)
                axis.set_ylim(bottom=0)
            else:
                axis.set_ylim(-0.03, 1.03)
            if row == 0 and column == 0:
                axis.legend(loc="lower left", bbox_to_anchor=(0, 1.12), ncol=6, frameon=False)
    axis = figure.add_subplot(grid[:, -1])
    _stability_lines(axis, summary.filter(pl.col("decoder") == decoders[0]), "nn_distance", colours, dashes)
    spacing = table.filter(pl.col("kind") == "data", pl.col("decoder") == decoders[0])["nn_distance"].median()
    if spacing is not None:
        axis.axhline(spacing, color="0.4", linestyle="--", linewidth=1)
        axis.annotate("local data spacing", (0, spacing), xytext=(2, 3), textcoords="offset points", fontsize=7)
    axis.set(xlabel="radius / typical norm", ylabel="distance to nearest stored state / typical norm")
    axis.set_title("distance to real data", fontsize=9, loc="left")
    figure.suptitle(
        f"Does meaning hold around the point? — {title}\n"
        f"mean over directions; bands: 95 % bootstrap over the {_directions_text(summary)}",
        y=1.04,
    )
    save_figure(figure, pdf, png, _stamp(table))


def plot_neighbourhood_map(
    table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str
) -> None:
    """The neighbourhood in its first two principal components, samples coloured by their decoded top token.

    Tokens come from the tuned lens where it reads the layer, else the logit lens; grey dots are the
    centre's nearest stored states, the star is the centre.
    """
    apply_style()
    layers = sorted(set(table["layer"]))
    figure, axes = plt.subplots(1, len(layers), figsize=(7 * len(layers), 5.5), squeeze=False)
    for axis, layer in zip(axes[0], layers, strict=True):
        at_layer = table.filter(pl.col("layer") == layer)
        decoder = "tuned" if "tuned" in set(at_layer["decoder"]) else "logit"
        data = at_layer.filter(pl.col("decoder") == decoder)
        stored = data.filter(pl.col("kind") == "data")
        axis.scatter(stored["pca1"], stored["pca2"], s=10, color="0.75", label="stored neighbours", zorder=1)
        samples = data.filter(pl.col("kind") == "sample", pl.col("radius") > 0)
        common = samples["top1_token"].value_counts(sort=True)["top1_token"].head(_TOKEN_COLOURS).to_list()
        samples = samples.with_columns(
            token=pl.when(pl.col("top1_token").is_in(common))
            .then(pl.col("top1_token").map_elements(_token_label, return_dtype=pl.String))
            .otherwise(pl.lit("(other)"))
        )
        hue_order = [_token_label(token) for token in common] + ["(other)"]
        sns.scatterplot(
            data=samples.to_pandas(), x="pca1", y="pca2", hue="token", hue_order=hue_order, style="family",
            style_order=[f for f in FAMILY_ORDER if f in set(samples["family"])], size="radius", sizes=(12, 60),
            alpha=0.8, ax=axis, zorder=2,
        )  # fmt: skip
        centre = data.filter(pl.col("kind") == "centre")
        axis.scatter(centre["pca1"], centre["pca2"], marker="*", s=250, color="black", label="centre", zorder=3)
        axis.set(xlabel="PC 1", ylabel="PC 2", title=f"{resid_address(layer)} · top token by the {decoder} lens")
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    figure.suptitle(f"The neighbourhood in two dimensions — {title}")
    save_figure(figure, pdf, png, _stamp(table))


def plot_path_strip(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Decoded top token along each path (rows: decoder x interpolation; columns: t), probability as colour."""
    apply_style()
    layers = sorted(set(table["layer"]))
    decoders = _decoders(table)
    interpolations = sorted(set(table["family"]))
    t_values = sorted(set(table["t"]))
    n_rows = len(decoders) * len(interpolations)
    figure, axes = plt.subplots(
        len(layers), 1, figsize=(max(8, 0.62 * len(t_values) + 3), 0.45 * n_rows * len(layers) + 1.6), squeeze=False
    )
    for axis, layer in zip(axes[:, 0], layers, strict=True):
        data = table.filter(pl.col("layer") == layer)
        probability = np.full((n_rows, len(t_values)), np.nan)
        labels = np.full((n_rows, len(t_values)), "", dtype=object)
        row_names = []
        for index, (decoder, how) in enumerate((d, i) for d in decoders for i in interpolations):
            row_names.append(f"{decoder} · {how}")
            cells = data.filter(pl.col("decoder") == decoder, pl.col("family") == how).sort("t")
            columns = [t_values.index(t) for t in cells["t"]]
            probability[index, columns] = cells["top1_prob"].to_numpy()
            labels[index, columns] = [_token_label(token)[:7] for token in cells["top1_token"]]
        sns.heatmap(
            probability, annot=labels, fmt="", annot_kws={"fontsize": 6}, cmap="Blues", vmin=0, vmax=1,
            cbar_kws={"label": "probability of the top token"}, ax=axis,
        )  # fmt: skip
        for end in (0.0, 1.0):
            if end in t_values:
                axis.axvline(t_values.index(end) + 0.5, color="crimson", linewidth=1.2)
        axis.set_xticks(np.arange(len(t_values)) + 0.5, [f"{t:g}" for t in t_values], rotation=0, fontsize=7)
        axis.set_yticks(np.arange(n_rows) + 0.5, row_names, rotation=0, fontsize=7)
        start, end = data["start"][0], data["end"][0]
        axis.set(xlabel=f"t  (0 = {start}, 1 = {end}; outside [0, 1] extrapolates)", title=resid_address(layer))
    figure.suptitle(f"Decoded along the path — {title}")
    save_figure(figure, pdf, png, _stamp(table))
