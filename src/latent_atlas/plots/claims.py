"""The claims figure: one strip per claim row, its interval against its threshold, coloured by verdict."""

import math
import os
import textwrap

import matplotlib.pyplot as plt
import polars as pl

from latent_atlas.plots import apply_style, draw_interval, save_figure

VERDICT_COLOURS = {"holds": "#1b9e77", "fails": "#d95f02", "inconclusive": "#7f7f7f"}


def _limits(row: dict) -> tuple[float, float]:
    """An x-range holding the estimate, the finite bounds and the threshold, with a margin."""
    values = [v for v in (row["estimate"], row["ci_low"], row["ci_high"], row["threshold"]) if math.isfinite(v)]
    low, high = min(values), max(values)
    margin = (high - low) * 0.15 or max(abs(high), 1e-12) * 0.5
    return low - margin, high + margin


def _label(row: dict) -> str:
    """The strip's label: the finding (wrapped), its paper and detail."""
    detail = f" · {row['detail']}" if row["detail"] else ""
    return textwrap.fill(f"{row['finding']}{detail}", 58) + f"\n{row['paper']}"


def plot_claims(table: pl.DataFrame, pdf: str | os.PathLike[str], png: str | os.PathLike[str], title: str) -> None:
    """Each claim row as its own strip: estimate, 95 % interval (bar), threshold (dashed), verdict colour.

    Strips do not share an x-axis: each statistic keeps its own scale. A claim without an interval (too few
    units) shows its estimate alone, hollow.
    """
    apply_style()
    count = max(table.height, 1)
    figure, axes = plt.subplots(count, 1, figsize=(10, 0.62 * count + 1.0), squeeze=False)
    for axis, row in zip(axes[:, 0], table.iter_rows(named=True), strict=False):
        colour = VERDICT_COLOURS.get(row["verdict"], "black")
        axis.axvline(row["threshold"], color="0.3", linestyle="--", linewidth=0.8)
        draw_interval(axis, [row["estimate"]], [row["ci_low"]], [row["ci_high"]], colour, kind="bars",
                      estimate=[0.0])  # fmt: skip
        finite = math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"])
        axis.scatter([row["estimate"]], [0.0], color=colour if finite else "white", edgecolor=colour, zorder=3, s=28)
        axis.set_xlim(*_limits(row))
        axis.set_yticks([])
        axis.set_ylabel(_label(row), rotation=0, ha="right", va="center", fontsize=7)
        axis.text(1.01, 0.5, f"{row['verdict']}\nn={row['n']} {row['unit']}", transform=axis.transAxes,
                  fontsize=7, color=colour, va="center")  # fmt: skip
        axis.tick_params(axis="x", labelsize=6, pad=1)
        axis.grid(False)
    if table.height == 0:
        axes[0, 0].text(0.5, 0.5, "no claims decided for this model and corpus", ha="center", va="center")
        axes[0, 0].set_axis_off()
    counts = dict(table.group_by("verdict").len().iter_rows()) if table.height else {}
    summary = ", ".join(f"{counts.get(name, 0)} {name}" for name in VERDICT_COLOURS)
    figure.suptitle(f"{title}: published findings decided ({summary}); bar: 95 % bootstrap interval, dashed: "
                    "threshold", fontsize=9)  # fmt: skip
    figure.tight_layout(h_pad=0.4)
    save_figure(figure, pdf, png, title)
