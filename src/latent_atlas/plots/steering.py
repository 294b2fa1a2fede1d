"""Steering figures: effect against strength, the effect-fluency frontier, the ITI probe map, examples."""

import os
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns

from latent_atlas.addresses import resid_address
from latent_atlas.claims.steering import KL_BOUND
from latent_atlas.names import GENERATION_METHODS
from latent_atlas.plots import apply_style, draw_interval, save_figure
from latent_atlas.steering.summary import (
    DIFFERENCE,
    GEOMETRIC_MEAN,
    MEAN,
    generation_summary,
    iti_probe_intervals,
    iti_summary,
)

METHOD_LABELS = {
    "actadd": "ActAdd (front-aligned, prompt pass)",
    "mean_difference": "mean difference (every position)",
    "icv": "in-context vector (every block)",
}


DECODING_STYLES = {"greedy": "-", "sampled": "--"}


def _methods(table: pl.DataFrame) -> list[str]:
    return [method for method in GENERATION_METHODS if method in set(table["method"])]


def _stamp(table: pl.DataFrame, title: str) -> str:
    decodings = ", ".join(sorted(set(table["decoding"]))) if "decoding" in table.columns else "-"
    return f"{title} · {decodings}"


def _where(method: str, layer: int) -> str:
    return "all blocks" if method == "icv" else resid_address(layer)


def _generation(summary: pl.DataFrame | None, table: pl.DataFrame) -> pl.DataFrame:
    """The generation methods' rows of the steering summary (computed from ``table`` when not given)."""
    if summary is None:
        summary = generation_summary(table)
    return summary.filter(pl.col("method").is_in(GENERATION_METHODS))


def _decoding_label(decodings: list[str]) -> str:
    return ", ".join(decodings)


def _interval_note(rows: pl.DataFrame) -> str:
    n = sorted(set(rows["n"].to_list()))
    units = f"n = {n[0]} {rows['unit'][0]}s" if len(n) == 1 else f"n = {n[0]}–{n[-1]} {rows['unit'][0]}s"
    return f"95% percentile bootstrap over {units}"


def plot_effect(
    table: pl.DataFrame,
    pdf: str | os.PathLike[str],
    png: str | os.PathLike[str],
    title: str,
    summary: pl.DataFrame | None = None,
) -> None:
    """Sentiment (VADER compound) against strength, one column per method.

    Top: mean sentiment; bottom: the paired change from the unsteered continuation of the same prompt, sample
    and decoding. Colour: layer; line style: decoding (solid greedy, dashed sampled); bands: 95% intervals
    resampling prompts (``summary``: :func:`latent_atlas.steering.summary.steering_summary`'s table). The legend
    names only the layers and decodings that ran.
    """
    apply_style()
    rows = _generation(summary, table).filter(pl.col("measure") == "sentiment")
    methods = _methods(rows)
    decodings = [d for d in DECODING_STYLES if d in set(rows["decoding"])]
    figure, axes = plt.subplots(2, len(methods), figsize=(5 * len(methods), 7.5), squeeze=False, sharex="col")
    for column, method in enumerate(methods):
        subset = rows.filter(pl.col("method") == method)
        layers = sorted(set(subset["layer"]))
        colours = dict(zip(layers, sns.color_palette("colorblind", len(layers)), strict=True))
        for row, statistic in enumerate((MEAN, DIFFERENCE)):
            axis = axes[row][column]
            for (layer, decoding), group in subset.filter(pl.col("statistic") == statistic).group_by(
                "layer", "decoding", maintain_order=True
            ):
                group = group.sort("coefficient")
                label = _where(method, layer) + (f" · {decoding}" if len(decodings) > 1 else "")
                axis.plot(
                    group["coefficient"],
                    group["estimate"],
                    marker="o",
                    markersize=4,
                    color=colours[layer],
                    linestyle=DECODING_STYLES[decoding],
                    label=label,
                )
                draw_interval(axis, group["coefficient"], group["ci_low"], group["ci_high"], colours[layer])
            axis.axhline(0, color="0.6", linewidth=0.8)
            if row == 0:
                axis.set(title=METHOD_LABELS[method], ylabel="mean sentiment (VADER compound)")
                axis.legend(fontsize=7, frameon=False)
            else:
                axis.set(xlabel="strength (λ for ICV)", ylabel="Δ sentiment vs unsteered (paired)")
    for row in range(2):
        shared = [axes[row][c] for c in range(len(methods))]
        low, high = min(a.get_ylim()[0] for a in shared), max(a.get_ylim()[1] for a in shared)
        for axis in shared:
            axis.set_ylim(low, high)
    figure.suptitle(
        f"Steering towards positive sentiment — {title}\n{_decoding_label(decodings)} decoding; bands: "
        f"{_interval_note(rows)}"
    )
    save_figure(figure, pdf, png, _stamp(table, title))


def plot_frontier(
    table: pl.DataFrame,
    pdf: str | os.PathLike[str],
    png: str | os.PathLike[str],
    title: str,
    summary: pl.DataFrame | None = None,
) -> None:
    """Effect against fluency: each point a (method, layer, strength), greedy continuations (else sampled).

    x: geometric-mean perplexity of the continuations under the unsteered model (log scale); y: mean
    sentiment; bars: 95% intervals of both, resampling prompts. Points of one method and layer are joined in
    order of strength; the unsteered setting is starred.
    """
    apply_style()
    rows = _generation(summary, table)
    decoding = "greedy" if "greedy" in set(rows["decoding"]) else sorted(set(rows["decoding"]))[0]
    rows = rows.filter(pl.col("decoding") == decoding, pl.col("statistic").is_in([MEAN, GEOMETRIC_MEAN]))
    keys = ["method", "layer", "coefficient"]
    sentiment = rows.filter(pl.col("measure") == "sentiment").select(*keys, "estimate", "ci_low", "ci_high")
    perplexity = rows.filter(pl.col("measure") == "perplexity").select(*keys, "estimate", "ci_low", "ci_high")
    points = sentiment.join(perplexity, on=keys, suffix="_perplexity").sort(keys)
    figure, axis = plt.subplots(figsize=(7.5, 5))
    palette = dict(zip(GENERATION_METHODS, sns.color_palette("colorblind", len(GENERATION_METHODS)), strict=True))
    markers = ["o", "s", "^", "D", "v", "P"]
    for (method, layer), group in points.group_by("method", "layer", maintain_order=True):
        layers = sorted(set(points.filter(pl.col("method") == method)["layer"]))
        marker = markers[layers.index(layer) % len(markers)]
        colour = palette[method]
        axis.plot(
            group["estimate_perplexity"],
            group["estimate"],
            marker=marker,
            color=colour,
            label=f"{method} · {_where(method, layer)}",
        )
        draw_interval(
            axis,
            group["estimate_perplexity"],
            group["ci_low"],
            group["ci_high"],
            colour,
            kind="bars",
            estimate=group["estimate"],
        )
        draw_interval(
            axis,
            group["estimate"],
            group["ci_low_perplexity"],
            group["ci_high_perplexity"],
            colour,
            kind="bars",
            estimate=group["estimate_perplexity"],
            horizontal=True,
        )
    baseline = points.filter(pl.col("coefficient") == 0)
    if baseline.height:
        axis.scatter(baseline["estimate_perplexity"], baseline["estimate"], marker="*", s=250, color="black", zorder=3)
        axis.annotate(
            "unsteered",
            (baseline["estimate_perplexity"][0], baseline["estimate"][0]),
            xytext=(6, -12),
            textcoords="offset points",
            fontsize=8,
        )
    axis.set(
        xscale="log",
        xlabel="perplexity under the unsteered model (geometric mean, log scale)",
        ylabel="mean sentiment (VADER compound)",
    )
    axis.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    note = _interval_note(rows) if rows.height else ""
    figure.suptitle(f"Effect against fluency ({decoding}) — {title}\nbars: {note}")
    save_figure(figure, pdf, png, _stamp(table, title))


def plot_iti(
    sweep: pl.DataFrame,
    probes: pl.DataFrame,
    pdf: str | os.PathLike[str],
    png: str | os.PathLike[str],
    title: str,
    summary: pl.DataFrame | None = None,
) -> None:
    """Left: test-split probe accuracy of every head (layer x head), the heads chosen on validation boxed.

    Middle: the chosen heads' test probe accuracy and their shuffled-label controls, in validation rank order,
    with 95% intervals resampling test items (a table without per-statement correctness draws no bars).

    Right: truth accuracy on the test items (bars: 95% intervals resampling items) and off-target KL against
    the shift strength α, with the KL bound within which the ITI claim picks α. Every number drawn is from the
    test split; the heads were fitted on train and ranked on validation.
    """
    apply_style()
    figure, (heat, chosen, curves) = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [1.1, 0.75, 1]})
    n_heads = int(probes["head"].max()) + 1
    grid = probes.sort("layer", "head")["test_accuracy"].to_numpy().reshape(-1, n_heads)
    n_test = int(probes["test_statements"][0])
    sns.heatmap(
        grid,
        cmap="viridis",
        vmin=0.5,
        vmax=max(0.75, float(grid.max())),
        ax=heat,
        cbar_kws={"label": f"probe accuracy on the test split (n = {n_test} statements)"},
    )
    for row in probes.filter(pl.col("selected")).iter_rows(named=True):
        heat.add_patch(plt.Rectangle((row["head"], row["layer"] - 1), 1, 1, fill=False, edgecolor="red", lw=1.5))
    layers = sorted(set(probes["layer"]))
    heat.set_yticks(np.arange(len(layers)) + 0.5, [str(layer) for layer in layers], fontsize=6, rotation=0)
    chance = float(probes["shuffled_test_accuracy"].mean())
    n_validation = int(probes["validation_statements"][0])
    boxed = f"boxed: top by validation accuracy (n = {n_validation})\nshuffled labels, mean over heads: {chance:.2f}"
    heat.set(xlabel="head", ylabel="block")
    heat.set_title(boxed, fontsize=9)
    _chosen_heads(chosen, probes)
    if summary is None or not summary.filter(pl.col("method") == "iti").height:
        summary = iti_summary(sweep)
    accuracy = summary.filter(pl.col("measure") == "truth_accuracy", pl.col("statistic") == MEAN).sort("coefficient")
    n_items = int(sweep["test_items"][0])
    curves.plot(accuracy["coefficient"], accuracy["estimate"], marker="o", label="truth accuracy (test items)")
    draw_interval(
        curves,
        accuracy["coefficient"],
        accuracy["ci_low"],
        accuracy["ci_high"],
        "C0",
        kind="bars",
        estimate=accuracy["estimate"],
    )
    curves.set(xlabel="α (shift in units of the activation std)", ylabel="truth accuracy (test)", ylim=(0, 1.02))
    twin = curves.twinx()
    twin.plot(sweep["coefficient"], sweep["off_target_kl"], marker="s", color="C3", label="off-target KL")
    twin.axhline(KL_BOUND, color="C3", linestyle=":", linewidth=1)
    twin.set_ylabel(f"off-target KL [nats] (dotted: claim's bound, {KL_BOUND:g})", color="C3")
    twin.grid(False)
    curves.legend(loc="lower left", fontsize=8, frameon=False)
    bars = _interval_note(accuracy) if np.isfinite(accuracy["ci_low"].to_numpy()).any() else "no per-item rows"
    curves.set_title(f"top {sweep['heads'][0]} heads, {n_items} test items\nbars: {bars}", fontsize=9)
    figure.suptitle(f"Inference-time intervention on true/false statements — {title}")
    save_figure(figure, pdf, png, title)


def _chosen_heads(axis: plt.Axes, probes: pl.DataFrame) -> None:
    """The selected heads' test probe accuracy (dots) and shuffled-label control (grey), with item-bootstrap bars."""
    if "ci_low" not in probes.columns:
        probes = iti_probe_intervals(probes)
    rows = probes.filter(pl.col("selected"))
    rows = rows.sort("validation_rank") if "validation_rank" in rows.columns else rows.sort("layer", "head")
    x = np.arange(rows.height)
    for column, low, high, colour, label in (
        ("test_accuracy", "ci_low", "ci_high", "C0", "probe"),
        ("shuffled_test_accuracy", "shuffled_ci_low", "shuffled_ci_high", "0.5", "shuffled labels"),
    ):
        offset = -0.12 if colour == "C0" else 0.12
        axis.plot(x + offset, rows[column], "o", color=colour, markersize=4, label=label)
        draw_interval(axis, x + offset, rows[low], rows[high], colour, kind="bars", estimate=rows[column])
    axis.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
    labels = [f"{layer}.{head}" for layer, head in zip(rows["layer"], rows["head"], strict=True)]
    axis.set_xticks(x, labels, rotation=90, fontsize=7)
    axis.set(xlabel="chosen head (block.head), by validation rank", ylabel="probe accuracy (test)", ylim=(0, 1.02))
    finite = rows.height and np.isfinite(rows["ci_low"].to_numpy()).any()
    bars = _interval_note(rows) if finite else "no per-statement rows"
    axis.set_title(f"chosen heads' probes on the test split\nbars: {bars}", fontsize=9)
    axis.legend(loc="lower right", fontsize=8, frameon=False)


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
                where = _where(method, layer)
                label = f"{method} · {where} · {top['coefficient'][0]:g}"
                rows.append((label, f"{prompt} ▸ {top['continuation'][0]}  [sentiment {top['sentiment'][0]:+.2f}]"))
    if optimised is not None:
        for row in optimised.iter_rows(named=True):
            status = "exact" if row["exact_match"] else f"BLEU {row['bleu']:.0f}"
            where = resid_address(row["layer"])
            rows.append((f"optimised · {where}", f"{row['target']} → {row['recovered']} ({status})"))
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
