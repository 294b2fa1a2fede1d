"""Geometry figures (RQ3).

Metrics by layer per post-processing, rogue dimensions, registers by layer, models by relative depth, and
geometry against performance. Spectrum-based metrics (IsoScore, effective rank) are shown without the
layer's massive tokens, with their bootstrap interval where measured (a band, or ± in a heat-map cell), and
under-powered values (n < power_ratio · d) are greyed: hollow markers, hatched cells, faded points. The pair
statistics (mean cosine, its top-3 share, the passage register AUC) and their paired changes draw their
percentile bootstrap over documents as a band wherever the table carries one.
"""

import os
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns

from latent_atlas.addresses import resid_address
from latent_atlas.geometry.metrics import POST_PROCESSINGS, SPECTRUM_METRICS, WITH_MASSIVE
from latent_atlas.geometry.relations import band_means
from latent_atlas.plots import apply_style, draw_interval, save_figure

Path = str | os.PathLike[str]

METRIC_LABELS = {
    "mean_cosine": "mean cosine (random pairs)",
    "cosine_top3_share": "top-3 dimensions' share of cosine",
    "isoscore": "IsoScore",
    "effective_rank": "effective rank",
    "twonn": "intrinsic dimension (TwoNN)",
    "norm_mean": "mean norm",
    "intra_similarity_adjusted": "intra-sentence similarity − baseline",
    "self_similarity_adjusted": "self-similarity − baseline",
    "mev_adjusted": "MEV − baseline",
    "passage_register_auc": "register AUC of passage cosine",
    "mean_cosine_change": "mean cosine − first measured layer's",
    "passage_register_auc_change": "register AUC − raw states'",
    "passage_mean_cosine": "mean cosine of passages",
    "position_probe_accuracy": "position probe accuracy",
    "register_probe_accuracy": "register probe accuracy",
}
PROCESSING_METRICS = (
    "mean_cosine",
    "cosine_top3_share",
    "isoscore",
    "effective_rank",
    "twonn",
    "intra_similarity_adjusted",
    "self_similarity_adjusted",
    "mev_adjusted",
    "passage_register_auc",
    "mean_cosine_change",
    "passage_register_auc_change",
)
CHANGE_METRICS = ("mean_cosine_change", "passage_register_auc_change")  # paired differences: a zero line
SHARE_PROCESSINGS = ("none", "standardise")  # where the rogue figure's top-3 share has an interval
REGISTER_METRICS = ("mean_cosine", "isoscore", "effective_rank", "twonn", "intra_similarity_adjusted", "norm_mean")
MODEL_METRICS = (
    "mean_cosine",
    "cosine_top3_share",
    "isoscore",
    "effective_rank",
    "twonn",
    "norm_mean",
    "self_similarity_adjusted",
    "passage_register_auc",
    "position_probe_accuracy",
)
SCATTER_METRICS = ("mean_cosine", "isoscore", "effective_rank", "twonn", "intra_similarity_adjusted")


def _spectrum_title(metric: str) -> str:
    label = METRIC_LABELS.get(metric, metric)
    return f"{label} (massive tokens removed)" if metric in SPECTRUM_METRICS else label


def _has(table: pl.DataFrame, column: str) -> bool:
    return column in table.columns and table[column].drop_nulls().len() > 0


def _bands(axis: plt.Axes, subset: pl.DataFrame, x: str, hue: str, colours: dict[str, Any]) -> set[int]:
    """Each line's interval as a band (rows without one are skipped); returns the document counts behind them."""
    units: set[int] = set()
    for name, colour in colours.items():
        rows = subset.filter(pl.col(hue) == name).sort(x)
        if not _has(rows, "ci_low"):
            continue
        band = rows.drop_nulls("ci_low")
        draw_interval(axis, band[x], band["ci_low"], band["ci_high"], colour, kind="band")
        if _has(band, "documents"):
            units |= set(band["documents"].drop_nulls().to_list())
    return units


def _percentile_bands(axis: plt.Axes, subset: pl.DataFrame, x: str, hue: str, colours: dict[str, Any]) -> str:
    """Bands of a pair statistic (percentile bootstrap over documents); returns a title line saying so ('' if none)."""
    documents = sorted(_bands(axis, subset, x, hue, colours))
    if not documents:
        return ""
    count = f"{documents[0]}" if len(documents) == 1 else f"{documents[0]}–{documents[-1]}"
    return f"\nband: percentile bootstrap over {count} documents"


def _decorate_spectrum(axis: plt.Axes, subset: pl.DataFrame, x: str, hue: str, colours: dict[str, Any]) -> None:
    """Bootstrap bands (where measured) and hollow white markers over the under-powered points of each line."""
    axis.text(
        0.99, 0.02, "band: bootstrap interval (bias-corrected)\nhollow: n < power_ratio·d", transform=axis.transAxes,
        ha="right", va="bottom", fontsize=6, color="0.35",
    )  # fmt: skip
    _bands(axis, subset, x, hue, colours)
    for name, colour in colours.items():
        rows = subset.filter(pl.col(hue) == name).sort(x)
        if rows.is_empty():
            continue
        if "powered" in rows.columns:
            weak = rows.filter(pl.col("powered").not_())
            axis.scatter(weak[x], weak["value"], s=22, facecolor="white", edgecolor=colour, linewidth=1.0, zorder=5)


def _grid(count: int, columns: int = 3, size: tuple[float, float] = (4.2, 3.2)) -> tuple[plt.Figure, np.ndarray]:
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, axes.flat


def _present(table: pl.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    available = set(table["metric"])
    return [metric for metric in metrics if metric in available]


def plot_processing(metrics: pl.DataFrame, pdf: Path, png: Path, title: str) -> None:
    """One panel per metric against layer, one line per post-processing (all registers together).

    Spectrum-based panels show the value without massive tokens, its bootstrap band where measured, hollow
    markers where under-powered, and the raw states' value with the massive tokens kept (dashed black). The
    pair statistics and their changes (a dotted zero line) show their percentile bands over documents.
    """
    apply_style()
    data = metrics.filter(pl.col("register") == "all")
    names = _present(data, PROCESSING_METRICS)
    figure, axes = _grid(len(names))
    order = [name for name in POST_PROCESSINGS if name in set(data["processing"])]
    colours = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    for index, (axis, metric) in enumerate(zip(axes, names, strict=False)):
        subset = data.filter(pl.col("metric") == metric).sort("layer")
        sns.lineplot(
            data=subset.to_pandas(), x="layer", y="value", hue="processing", hue_order=order, palette=colours,
            marker="o", markersize=3, ax=axis, legend=index == 0,
        )  # fmt: skip
        if metric in SPECTRUM_METRICS:
            _decorate_spectrum(axis, subset, "layer", "processing", colours)
            kept = data.filter((pl.col("metric") == metric + WITH_MASSIVE) & (pl.col("processing") == "none"))
            if not kept.is_empty():
                kept = kept.sort("layer")
                axis.plot(kept["layer"], kept["value"], color="black", linestyle="--", linewidth=0.8)
                axis.text(
                    0.01, 0.98, "dashed: none, massive tokens kept", transform=axis.transAxes, ha="left", va="top",
                    fontsize=6, color="0.2",
                )  # fmt: skip
        note = "" if metric in SPECTRUM_METRICS else _percentile_bands(axis, subset, "layer", "processing", colours)
        if metric in CHANGE_METRICS:
            axis.axhline(0.0, color="0.4", linestyle=":", linewidth=0.8)
        axis.set_title(_spectrum_title(metric) + note, fontsize=10 if note else None)
        axis.set(xlabel="layer", ylabel="")
    if names:
        axes[0].legend(fontsize=7, frameon=False, title="post-processing", title_fontsize=7)
    figure.suptitle(f"Geometry by layer, before and after post-processing — {title}")
    figure.tight_layout()
    save_figure(figure, pdf, png, title)


def _spread_layers(layers: list[int], count: int = 4) -> list[int]:
    """Up to ``count`` layers spread from first to last."""
    if len(layers) <= count:
        return layers
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


def plot_rogue(rogue: pl.DataFrame, pdf: Path, png: Path, title: str, metrics: pl.DataFrame | None = None) -> None:
    """The ten dimensions with the largest share of cosine (top) and of squared distance (bottom), raw states.

    With the geometry table (``metrics``), a last column draws the top-3 dimensions' share of the cosine by
    layer, raw and standardised, with its percentile bootstrap over documents (the bars' first three, summed).
    """
    apply_style()
    data = rogue.filter(pl.col("processing") == "none")
    layers = _spread_layers(sorted(set(data["layer"])))
    shares = _top3_shares(metrics)
    extra = int(not shares.is_empty())
    figure, axes = plt.subplots(2, len(layers) + extra, figsize=(3.6 * (len(layers) + extra), 6), squeeze=False)
    if extra:
        _top3_panel(axes[0, -1], shares)
        axes[1, -1].set_visible(False)
    for column, layer in enumerate(layers):
        for row, kind in enumerate(("cosine", "euclidean")):
            subset = data.filter((pl.col("layer") == layer) & (pl.col("kind") == kind)).sort("rank")
            axis = axes[row, column]
            axis.bar(range(len(subset)), subset["share"].to_list(), color=sns.color_palette()[row])
            axis.set_xticks(range(len(subset)), [str(d) for d in subset["dimension"]], rotation=90, fontsize=7)
            axis.set(title=resid_address(layer), xlabel="dimension", ylabel=f"share of {kind}" if column == 0 else "")
    figure.suptitle(f"Rogue dimensions (Timkey & van Schijndel) — {title}")
    figure.tight_layout()
    save_figure(figure, pdf, png, title)


def _top3_shares(metrics: pl.DataFrame | None) -> pl.DataFrame:
    """The all-register top-3 cosine share rows of the processings it is bootstrapped for (empty without them)."""
    if metrics is None or "cosine_top3_share" not in set(metrics["metric"]):
        return pl.DataFrame()
    return metrics.filter(
        (pl.col("metric") == "cosine_top3_share") & (pl.col("register") == "all")
        & pl.col("processing").is_in(list(SHARE_PROCESSINGS))
    ).sort("layer")  # fmt: skip


def _top3_panel(axis: plt.Axes, shares: pl.DataFrame) -> None:
    """Top-3 share of cosine by layer per processing, with its percentile band over documents."""
    order = [name for name in SHARE_PROCESSINGS if name in set(shares["processing"])]
    colours = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    for name, colour in colours.items():
        rows = shares.filter(pl.col("processing") == name)
        axis.plot(rows["layer"], rows["value"], color=colour, marker="o", markersize=3, label=name)
    note = _percentile_bands(axis, shares, "layer", "processing", colours)
    axis.set_title("top-3 dimensions' share of cosine by layer" + note, fontsize=10 if note else None)
    axis.set(xlabel="layer", ylabel="share of cosine", ylim=(0, 1.05))
    axis.legend(fontsize=7, frameon=False, title="post-processing", title_fontsize=7, loc="center right")


def plot_registers(metrics: pl.DataFrame, pdf: Path, png: Path, title: str) -> None:
    """Heat-maps register × layer for the raw states, one per metric, as differences from each layer's mean.

    Layers differ far more than registers do, so each column is centred on its mean over registers (the
    mean is printed under the column); equal-size samples per register. Spectrum-based cells print their
    bootstrap interval's half-width and are hatched and faded where under-powered.
    """
    apply_style()
    data = metrics.filter((pl.col("register") != "all") & (pl.col("processing") == "none"))
    names = _present(data, REGISTER_METRICS) if not data.is_empty() else []
    figure, axes = _grid(max(len(names), 1), columns=2, size=(6.5, 3.6))
    if not names:
        axes[0].text(0.5, 0.5, "the corpus has no register labels", ha="center", va="center")
        axes[0].set_axis_off()
    for axis, metric in zip(axes, names, strict=False):
        grid = (
            data.filter(pl.col("metric") == metric).pivot(on="layer", index="register", values="value").sort("register")
        )
        values = grid.drop("register").to_numpy()
        means = values.mean(0)
        limit = float(np.abs(values - means).max()) or 1.0
        labels = [f"{layer}\n{mean:.3g}" for layer, mean in zip(grid.columns[1:], means, strict=True)]
        sns.heatmap(
            values - means, ax=axis, cmap="vlag", center=0, vmin=-limit, vmax=limit, cbar=True, xticklabels=labels,
            yticklabels=grid["register"].to_list(),
        )  # fmt: skip
        heading = f"{METRIC_LABELS.get(metric, metric)}: register − layer mean"
        if metric in SPECTRUM_METRICS:
            heading = _mark_register_cells(axis, data.filter(pl.col("metric") == metric), grid, heading)
        axis.set(title=heading, xlabel="layer (layer mean)", ylabel="")
        axis.tick_params(axis="x", labelsize=7)
    figure.suptitle(f"Geometry per register (raw states) — {title}")
    figure.tight_layout()
    save_figure(figure, pdf, png, title)


def _mark_register_cells(axis: plt.Axes, rows: pl.DataFrame, grid: pl.DataFrame, title: str) -> str:
    """Print ±half-width of each cell's bootstrap interval; hatch and fade the under-powered cells."""
    registers, layers = grid["register"].to_list(), grid.columns[1:]
    lookup = {(row["register"], str(row["layer"])): row for row in rows.iter_rows(named=True)}
    weak = 0
    for i, register in enumerate(registers):
        for j, layer in enumerate(layers):
            row = lookup.get((register, layer))
            if row is None:
                continue
            if row.get("ci_low") is not None and np.isfinite(row["ci_low"]):
                half = (row["ci_high"] - row["ci_low"]) / 2
                axis.text(j + 0.5, i + 0.5, f"±{half:.2g}", ha="center", va="center", fontsize=5.5, color="0.15")
            if row.get("powered") is False:
                weak += 1
                axis.add_patch(
                    plt.Rectangle((j, i), 1, 1, facecolor="white", alpha=0.45, hatch="///", edgecolor="0.55", lw=0)
                )
    if weak:
        low, high = rows["n"].min(), rows["n"].max()
        sizes = f"{low}" if low == high else f"{low}–{high}"
        title += f"\nhatched: under-powered (n = {sizes} < power_ratio·d); ±: bootstrap, ≥ 5 documents"
    return title


def plot_models(geometry: pl.DataFrame, readout: pl.DataFrame, pdf: Path, png: Path, title: str) -> None:
    """Each metric by relative depth, one line per model (raw states), and the readout-rescaling check."""
    apply_style()
    data = geometry.filter((pl.col("register") == "all") & (pl.col("processing") == "none"))
    names = _present(data, MODEL_METRICS)
    figure, axes = _grid(len(names) + 1)
    models = sorted(set(data["model"]))
    colours = dict(zip(models, sns.color_palette(n_colors=len(models)), strict=True))
    for index, (axis, metric) in enumerate(zip(axes, names, strict=False)):
        subset = data.filter(pl.col("metric") == metric).sort("model", "layer")
        sns.lineplot(
            data=subset.to_pandas(), x="relative_depth", y="value", hue="model", hue_order=models, palette=colours,
            marker="o", markersize=3, ax=axis, legend=index == 0,
        )  # fmt: skip
        note = ""
        if metric in SPECTRUM_METRICS:
            _decorate_spectrum(axis, subset, "relative_depth", "model", colours)
        else:
            note = _percentile_bands(axis, subset, "relative_depth", "model", colours)
        shuffled = metric.replace("_accuracy", "_shuffled")
        if metric.endswith("_probe_accuracy") and shuffled in set(geometry["metric"]):
            control = geometry.filter(pl.col("metric") == shuffled).sort("model", "layer")
            sns.lineplot(
                data=control.to_pandas(), x="relative_depth", y="value", hue="model", hue_order=models,
                linestyle=":", ax=axis, legend=False,
            )  # fmt: skip
            axis.set_title(f"{METRIC_LABELS[metric]} (dotted: shuffled labels)")
        else:
            axis.set_title(_spectrum_title(metric) + note, fontsize=10 if note else None)
        axis.set(xlabel="relative depth (layer / L)", ylabel="")
    _readout_panel(axes[len(names)], readout)
    figure.suptitle(f"Geometry by relative depth, raw states — {title}")
    figure.tight_layout()
    save_figure(figure, pdf, png, title)


def _readout_panel(axis: plt.Axes, readout: pl.DataFrame) -> None:
    """Mean cosine of unembedding rows with the final norm's gain on either side (Steck et al.)."""
    rows = readout.filter(pl.col("quantity").is_in(["unembedding_mean_cosine", "unembedding_mean_cosine_folded"]))
    data = rows.with_columns(
        pl.col("quantity").replace({"unembedding_mean_cosine": "W_U", "unembedding_mean_cosine_folded": "W_U·diag(γ)"})
    )
    sns.barplot(data=data.to_pandas(), x="model", y="value", hue="quantity", ax=axis)
    changes = readout.filter(pl.col("quantity") == "max_abs_logit_change")
    note = ", ".join(f"{m}: {v:.1e}" for m, v in zip(changes["model"], changes["value"], strict=True))
    axis.set(title="readout rescaling: cosine of W_U rows", xlabel=f"max |Δ logit| {note}", ylabel="mean cosine")
    axis.legend(fontsize=7, frameon=False)


def _performance_bars(axis: plt.Axes, per_register: pl.DataFrame, models: list[str]) -> None:
    """Each bar's 95 % document-bootstrap interval (tables written before the intervals existed draw none)."""
    if "bits_per_byte_ci_low" not in per_register.columns:
        return
    registers = per_register["register"].unique(maintain_order=True).to_list()
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        rows = per_register.filter(pl.col("model") == model)
        position = {register: k for k, register in enumerate(registers)}
        y = np.array([position[r] for r in rows["register"]]) - 0.4 + width * (index + 0.5)
        values, low, high = (rows[c].to_numpy() for c in ("bits_per_byte", "bits_per_byte_ci_low",
                                                          "bits_per_byte_ci_high"))  # fmt: skip
        draw_interval(axis, y, low, high, "0.2", kind="bars", estimate=values, horizontal=True)


def plot_performance(
    geometry: pl.DataFrame,
    performance: pl.DataFrame,
    relations: pl.DataFrame,
    pdf: Path,
    png: Path,
    title: str,
) -> None:
    """Bits-per-byte per register and model, then middle-band geometry against it, one point per (model, register)."""
    apply_style()
    figure, axes = _grid(len(SCATTER_METRICS) + 1, size=(5.0, 3.6))
    per_register = performance.filter(pl.col("register") != "all").sort("register")
    models = sorted(set(performance["model"]))
    sns.barplot(
        data=per_register.to_pandas(), x="bits_per_byte", y="register", hue="model", hue_order=models, ax=axes[0]
    )
    _performance_bars(axes[0], per_register, models)
    axes[0].set(title="bits per byte (held-out split)", xlabel="bits per byte", ylabel="")
    axes[0].legend(fontsize=7, frameon=True, loc="lower right")
    registers = geometry.filter((pl.col("register") != "all") & (pl.col("processing") == "none"))
    bands = band_means(
        registers.select("model", "register", "processing", "metric", "layer", "relative_depth", "value")
    )
    points = bands.filter(pl.col("band") == "middle").join(
        per_register.select("model", "register", "bits_per_byte"), on=["model", "register"]
    )
    for index, (axis, metric) in enumerate(zip(axes[1:], SCATTER_METRICS, strict=False)):
        subset = points.filter(pl.col("metric") == metric)
        if subset.is_empty():
            axis.set_visible(False)
            continue
        weak = _under_powered(registers, metric)
        sns.scatterplot(
            data=subset.to_pandas(), x="value", y="bits_per_byte", hue="model", hue_order=models, style="register",
            style_order=sorted(set(points["register"])), ax=axis, legend=index == len(SCATTER_METRICS) - 1, s=40,
            alpha=0.35 if weak else 1.0,
        )  # fmt: skip
        if index == len(SCATTER_METRICS) - 1:
            axis.legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
        label = f"{METRIC_LABELS[metric]} (middle layers)"
        if weak:
            axis.set_facecolor("0.93")
            label += f"\nfaded: under-powered in {weak} (n < power_ratio·d)"
        axis.set(title=_relation_title(relations, metric), xlabel=label, ylabel="bits per byte")
    figure.suptitle(f"Geometry and performance, one point per (model, register) — {title}")
    figure.tight_layout()
    save_figure(figure, pdf, png, title)


def _under_powered(registers: pl.DataFrame, metric: str) -> str:
    """Which models' per-register values of a spectrum-based metric are under-powered ('' if none)."""
    if metric not in SPECTRUM_METRICS or "powered" not in registers.columns:
        return ""
    weak = registers.filter((pl.col("metric") == metric) & (pl.col("powered").not_()))
    return ", ".join(sorted(set(weak["model"])))


def _relation_title(relations: pl.DataFrame, metric: str) -> str:
    """Spearman's ρ pooled and within each model, with the number of points behind it, said plainly."""
    rows = relations.filter(
        pl.col("level").str.starts_with("registers") & (pl.col("metric") == metric)
        & (pl.col("processing") == "none") & (pl.col("band") == "middle") & (pl.col("measure") == "bits_per_byte")
    )  # fmt: skip
    pooled = rows.filter(pl.col("level") == "registers")
    if pooled.is_empty():
        return METRIC_LABELS[metric]
    n, n_models = pooled["n"][0], pooled["n_models"][0]
    within = rows.filter(pl.col("level") != "registers").sort("model")
    inner = ", ".join(f"{model} {rho:+.2f}" for model, rho in zip(within["model"], within["spearman"], strict=True))
    return f"Spearman ρ = {pooled['spearman'][0]:+.2f} ({n} points, {n_models} models)\nwithin: {inner}"
