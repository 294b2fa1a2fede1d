"""Steering figures: effect against strength, the effect-fluency frontier, the ITI probe map, examples."""

import os
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns

from latent_atlas.plots import apply_style, save_figure

METHOD_ORDER = ("actadd", "mean_difference", "icv")
METHOD_LABELS = {
    "actadd": "ActAdd (front-aligned, prompt pass)",
    "mean_difference": "mean difference (every position)",
    "icv": "in-context vector (every block)",
}


def _methods(table: pl.DataFrame) -> list[str]:
    return [method for method in METHOD_ORDER if method in set(table["method"])]


def _stamp(table: pl.DataFrame, title: str) -> str:
    decodings = ", ".join(sorted(set(table["decoding"]))) if "decoding" in table.columns else "-"
    return f"{title} · {decodings}"


def plot_effect(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Mean sentiment of continuations (VADER compound) against strength, one panel per method.

    Lines are layers; solid greedy, dashed sampled; bands are ± one standard error over prompts.
    """
    apply_style()
    methods = _methods(table)
    figure, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False, sharey=True)
    data = table.with_columns(layer=pl.format("resid.{}", pl.col("layer")))
    for axis, method in zip(axes[0], methods, strict=True):
        subset = data.filter(pl.col("method") == method)
        if method == "icv":
            subset = subset.with_columns(layer=pl.lit("all blocks"))
        sns.lineplot(
            data=subset.to_pandas(), x="coefficient", y="sentiment", hue="layer", style="decoding",
            style_order=["greedy", "sampled"], errorbar="se", marker="o", markersize=4, ax=axis,
        )  # fmt: skip
        axis.set(title=METHOD_LABELS[method], xlabel="strength (λ for ICV)", ylabel="sentiment (VADER compound)")
        axis.axhline(0, color="0.6", linewidth=0.8)
        axis.legend(fontsize=7, frameon=False)
    figure.suptitle(f"Steering towards positive sentiment — {title}")
    save_figure(figure, pdf, png, _stamp(table, title))


def plot_frontier(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Effect against fluency: each point a (method, layer, strength), greedy continuations averaged.

    x: median perplexity of the continuations under the unsteered model (log scale); y: mean sentiment.
    Points of one method and layer are joined in order of strength; the unsteered setting is starred.
    """
    apply_style()
    greedy = table.filter(pl.col("decoding") == "greedy")
    points = (
        greedy.group_by("method", "layer", "coefficient")
        .agg(pl.col("sentiment").mean(), pl.col("perplexity").median(), pl.col("off_target_kl").first())
        .sort("method", "layer", "coefficient")
    )
    figure, axis = plt.subplots(figsize=(7.5, 5))
    palette = dict(zip(METHOD_ORDER, sns.color_palette("colorblind", len(METHOD_ORDER)), strict=True))
    markers = ["o", "s", "^", "D", "v", "P"]
    for (method, layer), group in points.group_by("method", "layer", maintain_order=True):
        layers = sorted(set(points.filter(pl.col("method") == method)["layer"]))
        marker = markers[layers.index(layer) % len(markers)]
        label = f"{method} · all blocks" if method == "icv" else f"{method} · resid.{layer}"
        axis.plot(group["perplexity"], group["sentiment"], marker=marker, color=palette[method], label=label)
    baseline = points.filter(pl.col("coefficient") == 0)
    if baseline.height:
        axis.scatter(baseline["perplexity"], baseline["sentiment"], marker="*", s=250, color="black", zorder=3)
        axis.annotate("unsteered", (baseline["perplexity"][0], baseline["sentiment"][0]), xytext=(6, -12),
                      textcoords="offset points", fontsize=8)  # fmt: skip
    axis.set(xscale="log", xlabel="median perplexity under the unsteered model (log)", ylabel="mean sentiment")
    axis.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.suptitle(f"Effect against fluency (greedy) — {title}")
    save_figure(figure, pdf, png, _stamp(table, title))


def plot_iti(
    sweep: pl.DataFrame, probes: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str
) -> None:
    """Left: test-split probe accuracy of every head (layer x head), the heads chosen on validation boxed.

    Right: truth accuracy on the test items and off-target KL against the shift strength α. Every number drawn
    is from the test split; the heads were fitted on train and ranked on validation.
    """
    apply_style()
    figure, (heat, curves) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    n_heads = int(probes["head"].max()) + 1
    grid = probes.sort("layer", "head")["test_accuracy"].to_numpy().reshape(-1, n_heads)
    n_test = int(probes["test_statements"][0])
    sns.heatmap(grid, cmap="viridis", vmin=0.5, vmax=max(0.75, float(grid.max())), ax=heat,
                cbar_kws={"label": f"probe accuracy on the test split (n = {n_test} statements)"})  # fmt: skip
    for row in probes.filter(pl.col("selected")).iter_rows(named=True):
        heat.add_patch(plt.Rectangle((row["head"], row["layer"] - 1), 1, 1, fill=False, edgecolor="red", lw=1.5))
    layers = sorted(set(probes["layer"]))
    heat.set_yticks(np.arange(len(layers)) + 0.5, [str(layer) for layer in layers], fontsize=6, rotation=0)
    chance = float(probes["shuffled_test_accuracy"].mean())
    n_validation = int(probes["validation_statements"][0])
    boxed = f"boxed: top by validation accuracy (n = {n_validation}); shuffled labels: {chance:.2f}"
    heat.set(xlabel="head", ylabel="block")
    heat.set_title(boxed, fontsize=9)
    n_items = int(sweep["test_items"][0])
    curves.plot(sweep["coefficient"], sweep["test_truth_accuracy"], marker="o", label="truth accuracy (test items)")
    curves.set(xlabel="α (shift in units of the activation std)", ylabel="truth accuracy (test)", ylim=(0, 1.02))
    twin = curves.twinx()
    twin.plot(sweep["coefficient"], sweep["off_target_kl"], marker="s", color="C3", label="off-target KL")
    twin.set_ylabel("off-target KL [nats]", color="C3")
    twin.grid(False)
    curves.legend(loc="lower left", fontsize=8, frameon=False)
    curves.set_title(f"top {sweep['heads'][0]} heads, {n_items} test items")
    figure.suptitle(f"Inference-time intervention on true/false statements — {title}")
    save_figure(figure, pdf, png, title)


def _wrap(text: str, width: int = 70) -> str:
    return "\n".join(textwrap.wrap(text.replace("\n", " ").strip(), width)) or "(empty)"


def plot_examples(
    generation: pl.DataFrame | None,
    optimised: pl.DataFrame | None,
    pdf: str | os.PathLike[str],
    png: str | os.PathLike[str],
    title: str,
) -> None:
    """A table of greedy continuations of the first prompt, and of what optimised vectors recovered.

    Rows: the unsteered continuation, then each method's strongest setting at each layer.
    """
    apply_style()
    rows: list[tuple[str, str]] = []
    if generation is not None:
        greedy = generation.filter(pl.col("decoding") == "greedy", pl.col("prompt_id") == 0)
        prompt = greedy["prompt"][0]
        unsteered = greedy.filter(pl.col("coefficient") == 0)["continuation"][0]
        rows.append(("unsteered", f"{prompt} ▸ {unsteered}"))
        for method in _methods(greedy):
            for layer in sorted(set(greedy.filter(pl.col("method") == method)["layer"])):
                setting = greedy.filter(pl.col("method") == method, pl.col("layer") == layer)
                top = setting.filter(pl.col("coefficient") == setting["coefficient"].max())
                where = "all blocks" if method == "icv" else f"resid.{layer}"
                label = f"{method} · {where} · {top['coefficient'][0]:g}"
                rows.append((label, f"{prompt} ▸ {top['continuation'][0]}  [sentiment {top['sentiment'][0]:+.2f}]"))
    if optimised is not None:
        for row in optimised.iter_rows(named=True):
            status = "exact" if row["exact_match"] else f"BLEU {row['bleu']:.0f}"
            rows.append((f"optimised · resid.{row['layer']}", f"{row['target']} → {row['recovered']} ({status})"))
    wrapped = [(label, _wrap(text)) for label, text in rows]
    height = 0.8 + sum(0.22 * (text.count("\n") + 1) + 0.12 for _, text in wrapped)
    figure, axis = plt.subplots(figsize=(11, max(2.0, height)))
    axis.set_axis_off()
    y = 1.0
    step = 1.0 / max(1.0, sum(text.count("\n") + 1.5 for _, text in wrapped))
    for label, text in wrapped:
        axis.text(0.0, y, label, fontsize=8, fontweight="bold", va="top", family="sans-serif")
        axis.text(0.3, y, text, fontsize=8, va="top", family="monospace")
        y -= step * (text.count("\n") + 1.5)
    figure.suptitle(f"Example continuations (greedy) — {title}")
    save_figure(figure, pdf, png, title)
