"""The learned readers' figures: the method comparison, ELM curves and controls, descriptions, paths."""

import os
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from latent_atlas.plots import apply_style, draw_interval, save_figure
from latent_atlas.readers.uncertainty import (
    PAPER_INPUT,
    PASSAGE_UNIT,
    accuracy_intervals,
    elm_controls,
    elm_intervals,
    has_items,
    paper_comparisons,
)
from latent_atlas.stats import summarise

METHOD_LABELS = {
    "clustering_all_bases": "semantic clustering\n(all bases)",
    "clustering_gt_only": "semantic clustering\n(gt only)",
    "semantic_bases": "semantic bases\n(untrained)",
    "zero_shot": "zero-shot\n(label words)",
    "in_context": "in-context\nlearning",
    "knn_prompting": "kNN\nprompting",
    "linear_probe": "linear\nprobe",
    "lora": "LoRA\n(fine-tuned)",
}
INPUTS = ("raw", "template")
INPUT_LABELS = {"raw": "raw text's last state", "template": "template's answer position"}
CONDITIONS = ("true", "shuffled", "none")
CONDITION_LABELS = {"true": "its own embedding", "shuffled": "another passage's", "none": "no embedding"}


def _require(table: pl.DataFrame, name: str) -> None:
    if table.is_empty():
        raise ValueError(f"the {name} table is empty: nothing to plot")


def method_summary(table: pl.DataFrame) -> pl.DataFrame:
    """Mean and standard deviation over seeds of each (task, method, input), methods in the figure's order.

    With per-item correctness (``doc_id``, ``correct``) it also gives ``accuracy`` over items × seeds and its
    95 % item-bootstrap interval (``ci_low``, ``ci_high``, ``n`` items, ``unit``); without, those are null. A
    table without an ``input`` column (written before both inputs were read) counts as ``raw`` for the state
    readers and ``template`` for the prompted ones.
    """
    _require(table, "clustering")
    if "input" not in table.columns:
        prompted = pl.col("method").is_in(["zero_shot", "in_context", "lora"])
        table = table.with_columns(input=pl.when(prompted).then(pl.lit("template")).otherwise(pl.lit("raw")))
    order = {method: i for i, method in enumerate(METHOD_LABELS)}
    summary = (
        table.group_by("task", "method", "input")
        .agg(
            pl.col("balanced_accuracy").mean().alias("mean"),
            pl.col("balanced_accuracy").std(ddof=1).fill_null(0.0).alias("std"),
            pl.col("macro_f1").mean().alias("macro_f1"),
            pl.len().alias("runs"),
            pl.col("n_classes").first(),
            pl.col("n_test").first(),
            pl.col("split_hash").n_unique().alias("splits"),
        )
        .with_columns(
            order=pl.col("method").replace_strict(order, default=len(order)),
            input_order=pl.col("input").replace_strict({name: i for i, name in enumerate(INPUTS)}, default=9),
        )
        .sort("task", "order", "input_order")
    )
    keys = ["task", "method", "input"]
    if has_items(table):
        intervals = accuracy_intervals(table).select(*keys, "accuracy", "ci_low", "ci_high", "n", "unit")
        return summary.join(intervals, on=keys, how="left", maintain_order="left")
    return summary.with_columns(
        accuracy=pl.lit(None, pl.Float64), ci_low=pl.lit(None, pl.Float64), ci_high=pl.lit(None, pl.Float64),
        n=pl.lit(None, pl.Int64), unit=pl.lit(None, pl.String),
    )  # fmt: skip


def plot_clustering(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Accuracy per method and input, one panel per task.

    Each method has a bar per input it read: the raw text's last state (hatched) and the template's answer
    position (solid); under each method, the input its paper reads. Bars are accuracy over test items × seeds,
    error bars its 95 % percentile bootstrap interval over test items (seeds kept together); dots: macro F1;
    dashed line: chance. In each panel, Gu et al.'s paired comparisons (clustering − in-context learning and
    − kNN prompting, each on its paper's input) with their intervals. A table without per-item correctness
    draws mean balanced accuracy over seeds and no interval.
    """
    apply_style()
    summary = method_summary(table)
    itemised = has_items(table)
    comparisons = paper_comparisons(table) if itemised else None
    tasks = list(dict.fromkeys(summary["task"]))
    methods_per_task = max(summary.filter(pl.col("task") == task)["method"].n_unique() for task in tasks)
    figure, axes = plt.subplots(1, len(tasks), figsize=(1.5 * methods_per_task * len(tasks) + 1, 4.8), squeeze=False)
    palette = [colour for i, colour in enumerate(sns.color_palette("colorblind", 10)) if i != 7]  # 7 is grey
    colours = dict(zip(METHOD_LABELS, palette, strict=False))
    width = 0.4
    for axis, task in zip(axes[0], tasks, strict=True):
        rows = summary.filter(pl.col("task") == task)
        methods = list(dict.fromkeys(rows["method"]))
        for position, method in enumerate(methods):
            bars = rows.filter(pl.col("method") == method)
            offsets = [0.0] if bars.height == 1 else [(i - 0.5) * width for i in range(bars.height)]
            for offset, row in zip(offsets, bars.iter_rows(named=True), strict=True):
                x = position + offset
                raw = row["input"] == "raw"
                height = row["accuracy"] if itemised else row["mean"]
                axis.bar(
                    x, height, width=width, color=colours.get(method, "0.5"), alpha=0.55 if raw else 1.0,
                    hatch="///" if raw else None, edgecolor="0.25", linewidth=0.4,
                )  # fmt: skip
                if itemised:
                    draw_interval(axis, [x], [row["ci_low"]], [row["ci_high"]], "black", kind="bars",
                                  estimate=[height])  # fmt: skip
                axis.scatter([x], [row["macro_f1"]], color="black", s=12, zorder=3)
        axis.axhline(1.0 / rows["n_classes"][0], color="0.4", linestyle="--", linewidth=0.9)
        labels = [f"{METHOD_LABELS.get(m, m)}\npaper: {PAPER_INPUT.get(m, '?')}" for m in methods]
        axis.set_xticks(np.arange(len(methods)), labels, fontsize=6.5)
        runs = ", ".join(sorted({str(r) for r in rows["runs"]}))
        axis.set(
            ylim=(0, 1.02),
            ylabel="accuracy (items × seeds)" if itemised else "balanced accuracy (mean over seeds)",
            title=f"{task} · {rows['n_classes'][0]} classes · {rows['n_test'][0]} held-out texts · seeds {runs}",
        )
        axis.title.set_fontsize(9)
        if comparisons is not None:
            _comparison_text(axis, comparisons.filter(pl.col("task") == task))
    figure.legend(handles=_legend_handles(), fontsize=8, frameon=False, loc="upper center", ncol=5,
                  bbox_to_anchor=(0.5, 0.95))  # fmt: skip
    figure.suptitle(f"Reading a text's state: semantic clustering against its baselines, on both inputs — {title}")
    figure.subplots_adjust(top=0.8)
    save_figure(figure, pdf, png, title)


def _comparison_text(axis: plt.Axes, comparisons: pl.DataFrame) -> None:
    """Gu et al.'s paired accuracy differences with their intervals, in the panel's lower left corner."""
    if comparisons.is_empty():
        return
    lines = [
        f"{METHOD_LABELS.get(r['method'], r['method']).splitlines()[0]} − {r['baseline'].replace('_', ' ')}: "
        f"{r['difference']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        for r in comparisons.iter_rows(named=True)
    ]
    lines.append(f"paired over {comparisons['n'][0]} test items, 95 % bootstrap")
    axis.text(0.01, 0.02, "\n".join(lines), transform=axis.transAxes, fontsize=6, va="bottom",
              bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7", "linewidth": 0.4})  # fmt: skip


def _legend_handles() -> list[Patch | Line2D]:
    """Legend entries: the two inputs' bar styles, macro F1 and chance."""
    return [
        Patch(facecolor="white", hatch="///", edgecolor="0.25", label=INPUT_LABELS["raw"]),
        Patch(facecolor="0.45", edgecolor="0.25", label=INPUT_LABELS["template"]),
        Line2D([], [], color="black", linewidth=1, label="95 % interval over test items"),
        Line2D([], [], marker="o", color="black", linestyle="", markersize=4, label="macro F1"),
        Line2D([], [], color="0.4", linestyle="--", label="chance"),
    ]


def condition_summary(evaluation: pl.DataFrame) -> pl.DataFrame:
    """Per condition: mean held-out reconstruction loss, generated-register accuracy and semantic consistency."""
    _require(evaluation, "ELM evaluation")
    return (
        evaluation.group_by("condition")
        .agg(
            pl.col("reconstruction_nll").mean(),
            pl.col("reconstruction_nll").std().alias("reconstruction_nll_std"),
            pl.col("register_correct").cast(pl.Float64).mean().alias("register_accuracy"),
            pl.col("consistency").mean(),
            pl.col("consistency").std().alias("consistency_std"),
            pl.len().alias("n"),
        )
        .with_columns(order=pl.col("condition").replace_strict({c: i for i, c in enumerate(CONDITIONS)}, default=9))
        .sort("order")
    )


def plot_elm(
    losses: pl.DataFrame, evaluation: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str
) -> None:
    """The adapter's training and its held-out controls.

    Left: training loss and held-out loss against examples seen. Right, per condition (its own embedding,
    another passage's, none): reconstruction loss, accuracy of the generated register, and semantic
    consistency judged by another model (when one is configured).
    """
    apply_style()
    _require(losses, "ELM losses")
    summary = condition_summary(evaluation)
    judged = summary["consistency"].is_not_null().any()
    panels = 4 if judged else 3
    figure, axes = plt.subplots(
        1, panels, figsize=(4.0 * panels, 3.8), gridspec_kw={"width_ratios": [1.6] + [1] * (panels - 1)}
    )
    axes[0].plot(losses["examples_seen"], losses["train_loss"], linewidth=0.8, alpha=0.6, label="training batches")
    heldout = losses.filter(pl.col("heldout_loss").is_not_null())
    axes[0].plot(heldout["examples_seen"], heldout["heldout_loss"], marker="o", label="held-out (own embedding)")
    axes[0].set(xlabel="training examples seen", ylabel="target loss (nats/token)", title="training")
    axes[0].legend(fontsize=7, frameon=False)
    colours = sns.color_palette("colorblind", len(CONDITIONS))
    labels = [CONDITION_LABELS[c] for c in summary["condition"]]
    intervals = elm_intervals(evaluation)
    if judged:
        judged_rows = evaluation.filter(pl.col("consistency").is_not_null())
        intervals["consistency"] = _by_condition(summarise(judged_rows, "consistency", ["condition"], "doc_id",
                                                           unit=PASSAGE_UNIT))  # fmt: skip
    x = np.arange(summary.height)
    metrics = [
        ("reconstruction_nll", "held-out reconstruction loss\n(nats/token, lower is better)"),
        ("register_correct", "generated register correct\n(fraction)"),
    ]
    if judged:
        metrics.append(("consistency", "semantic consistency\n(cosine in the judge's space)"))
    for axis, (metric, label) in zip(axes[1:], metrics, strict=True):
        table = _by_condition(intervals[metric]).join(summary.select("condition"), on="condition", how="right")
        values = table[metric].fill_null(0.0).to_numpy()
        axis.bar(x, values, color=colours[: summary.height])
        draw_interval(axis, x, table["ci_low"].fill_null(np.nan), table["ci_high"].fill_null(np.nan), "black",
                      kind="bars", estimate=values)  # fmt: skip
        axis.set_xticks(x, labels, fontsize=7, rotation=15)
        axis.set_title(label, fontsize=8)
    _control_text(axes[1], elm_controls(evaluation))
    figure.suptitle(
        f"ELM adapter (stage 1, model frozen) and its controls on {summary['n'][0]} held-out passages "
        f"(95 % bootstrap intervals over passages) — {title}",
        y=1.05,
    )
    save_figure(figure, pdf, png, title)


def _by_condition(table: pl.DataFrame) -> pl.DataFrame:
    """A per-condition table in the order own, shuffled, none."""
    order = {condition: i for i, condition in enumerate(CONDITIONS)}
    return table.sort(pl.col("condition").replace_strict(order, default=len(order)))


def _control_text(axis: plt.Axes, controls: pl.DataFrame) -> None:
    """The paired reconstruction-loss differences (control − own) with their intervals, inside the panel."""
    rows = controls.filter(pl.col("measure") == "reconstruction_nll")
    lines = [
        f"{r['condition']} − own: {r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        for r in rows.iter_rows(named=True)
    ]
    if lines:
        lines.append(f"paired over {rows['n'][0]} passages")
        axis.text(0.02, 0.02, "\n".join(lines), transform=axis.transAxes, fontsize=6, va="bottom",
                  bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7", "linewidth": 0.4})  # fmt: skip


def _wrap(text: str | None, width: int) -> str:
    return "\n".join(textwrap.wrap((text or "").replace("\n", " ").strip(), width)) or "(empty)"


def _text_table(
    rows: list[tuple[str, list[str]]],
    headers: list[str],
    widths: list[float],
    suptitle: str,
    stamp: str,
    pdf: str | os.PathLike[str],
    png: str | os.PathLike[str],
) -> None:
    """Draw rows of wrapped text cells under column headers."""
    apply_style()
    lines = [max(cell.count("\n") + 1 for cell in cells) for _, cells in rows]
    height = 1.0 + 0.19 * (sum(lines) + 1.2 * len(rows))
    figure, axis = plt.subplots(figsize=(sum(widths) + 1.6, max(2.2, height)))
    axis.set_axis_off()
    total = sum(lines) + 1.2 * len(rows) + 1.5
    edges = np.concatenate([[0.2], 0.2 + 0.8 * np.cumsum(widths) / sum(widths)])
    for column, header in enumerate(headers):
        axis.text(edges[column], 1.0, header, fontsize=8, fontweight="bold", va="top")
    y = 1.0 - 1.5 / total
    for (label, cells), n_lines in zip(rows, lines, strict=True):
        axis.text(0.0, y, label, fontsize=7, fontweight="bold", va="top")
        for column, cell in enumerate(cells):
            axis.text(edges[column], y, cell, fontsize=7, va="top", family="monospace")
        y -= (n_lines + 1.2) / total
    figure.suptitle(suptitle)
    save_figure(figure, pdf, png, stamp)


def plot_descriptions(
    evaluation: pl.DataFrame, examples: int, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str
) -> None:
    """Held-out passages: their opening words, and what the model says of them.

    Columns: the generation from the passage's own embedding and from another passage's (shuffled), each
    with the register the model names from the same embedding.
    """
    _require(evaluation, "ELM evaluation")
    docs = list(dict.fromkeys(evaluation["doc_id"]))[:examples]
    rows = []
    for doc in docs:
        by = {row["condition"]: row for row in evaluation.filter(pl.col("doc_id") == doc).iter_rows(named=True)}
        true = by["true"]
        cells = [_wrap(true["reference"], 34)] + [
            _wrap(f"{by[c]['reconstruction_generated']}  [{by[c]['register_predicted'] or '?'}]", 34)
            for c in ("true", "shuffled")
            if c in by
        ]
        rows.append((f"{doc}\n" + _wrap(true["label"].replace("_", " "), 18), cells))
    headers = ["passage opens", "from its embedding", "from another's (shuffled)"]
    _text_table(
        rows,
        headers,
        [3.2, 3.2, 3.2],
        f"What the ELM says of held-out points (greedy; [register named]) — {title}",
        title,
        pdf,
        png,
    )


def plot_paths(paths: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Descriptions along an interpolation between two held-out passages and along a register direction."""
    _require(paths, "ELM paths")
    rows = []
    for kind, symbol in (("interpolation", "t"), ("direction", "scale")):
        for row in paths.filter(pl.col("kind") == kind).sort("position").iter_rows(named=True):
            label = f"{kind}\n{symbol} = {row['position']:g}"
            rows.append(
                (
                    label,
                    [
                        _wrap(row["reconstruction_generated"], 60),
                        _wrap(row["register_predicted"] or row["register_generated"], 18),
                    ],
                )
            )
    first = paths.row(0, named=True)
    suptitle = f"ELM descriptions from {first['from_doc']} towards {first['to_doc']} — {title}"
    _text_table(rows, ["the passage begins (generated)", "register named"], [6.0, 1.8], suptitle, title, pdf, png)
