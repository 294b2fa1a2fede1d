"""Figures of a trained family: members that differ only in their training data, beside pretrained models.

Performance per register (a heat-map with each member's own registers outlined), training curves, geometry
and lens metrics by relative depth (one line per member, pretrained models dashed), and model-level
geometry against bits per byte.
"""

import json
import os

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from latent_atlas.geometry.relations import band_means
from latent_atlas.plots import PALETTE, apply_style, draw_interval, save_figure
from latent_atlas.plots.geometry import METRIC_LABELS, _grid, _present

Path = str | os.PathLike[str]

DEFAULT_METRICS = (
    "mean_cosine",
    "isoscore",
    "effective_rank_fraction",
    "twonn",
    "cosine_top3_share",
    "self_similarity_adjusted",
)
RELATION_METRICS = ("mean_cosine", "isoscore", "effective_rank_fraction", "twonn")
# metrics the family adds to the geometry tables (latent_atlas.training.evaluate.add_rank_fraction)
FAMILY_METRIC_LABELS = {"effective_rank_fraction": "effective rank / width"}
LENS_PANELS = (
    ("logit", "kl_to_final", "KL(p_final ‖ p_lens) [nats]", "symlog"),
    ("tuned", "kl_to_final", "KL(p_final ‖ p_lens) [nats]", "symlog"),
    ("logit", "ce_next_token", "cross-entropy to next token [nats]", "log"),
    ("tuned", "ce_next_token", "cross-entropy to next token [nats]", "log"),
    ("logit", "top1_agreement", "top-1 agreement with final", "linear"),
)
RELATION_BAND = "late"
BPB_LOW, BPB_HIGH = "bits_per_byte_ci_low", "bits_per_byte_ci_high"  # latent_atlas.evaluation's document bootstrap
_PRETRAINED_COLOURS = ("0.0", "0.45")
_PRETRAINED_DASHES = ("--", "-.", ":")
_PRETRAINED_MARKERS = ("s", "D", "^", "v", "P")
_DEPTH_LABEL = "relative depth (layer / L)"


def _require(table: pl.DataFrame, name: str) -> None:
    """Refuse an empty table, naming it."""
    if table.is_empty():
        raise ValueError(f"the {name} table is empty: there is nothing to plot")


def _models(table: pl.DataFrame) -> tuple[list[str], list[str]]:
    """Members then pretrained models, each in order of first appearance (no ``kind`` column: all members)."""
    if "kind" not in table.columns:
        return table["model"].unique(maintain_order=True).to_list(), []
    pairs = table.select("model", "kind").unique(maintain_order=True)
    members = pairs.filter(pl.col("kind") == "member")["model"].to_list()
    return members, [model for model in pairs["model"].to_list() if model not in set(members)]


def _member_colours(members: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per member, the house palette while it lasts, evenly spaced hues beyond it."""
    colours = sns.color_palette(PALETTE)
    if len(members) > len(colours):
        colours = sns.color_palette("husl", len(members))
    return dict(zip(members, colours, strict=False))


def _line_styles(members: list[str], pretrained: list[str]) -> dict[str, dict[str, object]]:
    """Matplotlib line keywords per model: members solid in colour, pretrained models dashed in black/grey."""
    styles: dict[str, dict[str, object]] = {
        model: {"color": colour, "linestyle": "-", "linewidth": 1.4}
        for model, colour in _member_colours(members).items()
    }
    for index, model in enumerate(pretrained):
        styles[model] = {
            "color": _PRETRAINED_COLOURS[index % len(_PRETRAINED_COLOURS)],
            "linestyle": _PRETRAINED_DASHES[index % len(_PRETRAINED_DASHES)],
            "linewidth": 1.6,
        }
    return styles


def _n_text(values: pl.Series, unit: str) -> str:
    """'n = 512 tokens' or 'n = 256–512 tokens', from a column of counts."""
    low, high = int(values.min()), int(values.max())
    return f"n = {low} {unit}" if low == high else f"n = {low}–{high} {unit}"


def _count(k: int, noun: str) -> str:
    """'1 pretrained model', '2 pretrained models'."""
    return f"{k} {noun}" if k == 1 else f"{k} {noun}s"


def _single(table: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    """Refuse a table that mixes several values of a column that should be fixed (corpus, split)."""
    for column in columns:
        if column in table.columns and table[column].n_unique() > 1:
            values = sorted(map(str, table[column].unique()))
            raise ValueError(
                f"the {name} table mixes several values of {column} ({', '.join(values)}): plot one at a time"
            )


def _depth_lines(axis: plt.Axes, data: pl.DataFrame, styles: dict[str, dict[str, object]]) -> None:
    """One line per model of value against relative depth, in the order of ``styles``."""
    for model, style in styles.items():
        line = data.filter(pl.col("model") == model).sort("relative_depth")
        if not line.is_empty():
            axis.plot(line["relative_depth"], line["value"], marker="o", markersize=2.5, label=model, **style)


def _depth_bands(axis: plt.Axes, data: pl.DataFrame, styles: dict[str, dict[str, object]], count: str) -> set[int]:
    """Each model's 95 % interval against relative depth as a band, where its rows carry one.

    Rows without a finite ``ci_low``/``ci_high`` (metrics without an interval, tables from before the
    bootstrap) draw nothing. Returns the unit counts (column ``count``) behind the bands drawn.
    """
    if not {"ci_low", "ci_high"} <= set(data.columns):
        return set()
    units: set[int] = set()
    finite = pl.col("ci_low").is_not_null() & pl.col("ci_high").is_not_null()
    for model, style in styles.items():
        rows = data.filter((pl.col("model") == model) & finite).sort("relative_depth")
        rows = rows.filter(pl.col("ci_low").is_finite() & pl.col("ci_high").is_finite())
        if rows.is_empty():
            continue
        draw_interval(axis, rows["relative_depth"], rows["ci_low"], rows["ci_high"], style["color"])
        if count in rows.columns:
            units |= {int(n) for n in rows[count].drop_nulls().to_list()}
    return units


def _band_text(units: set[int], noun: str) -> str:
    """'; bands: 95 % bootstrap over 36 documents' (or '26–36 documents'), or '' when no band was drawn."""
    if not units:
        return ""
    low, high = min(units), max(units)
    return f"; bands: 95 % bootstrap over {low if low == high else f'{low}–{high}'} {noun}"


def _model_legend(figure: plt.Figure, styles: dict[str, dict[str, object]]) -> None:
    """One legend for the figure, right of the panels."""
    handles = [Line2D([], [], marker="o", markersize=2.5, label=model, **style) for model, style in styles.items()]
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7)


def _check_unique(table: pl.DataFrame, keys: list[str], name: str) -> None:
    """Refuse duplicated rows (several corpora or splits concatenated, say) rather than averaging them."""
    if table.select(keys).is_duplicated().any():
        raise ValueError(
            f"the {name} table has several rows per ({', '.join(keys)}): pass one table per corpus and split"
        )


# -- performance -----------------------------------------------------------------------------------------------


def _mixture(text: str | None) -> dict[str, float]:
    """A member's mixture weights from their JSON (none for a pretrained model)."""
    return {} if text is None else {str(key): float(value) for key, value in json.loads(text).items()}


def performance_grid(matrix: pl.DataFrame, measure: str = "bits_per_byte") -> tuple[list[str], list[str], np.ndarray]:
    """Models × registers of one measure: the grid the performance heat-map draws.

    Rows: members in order of first appearance, then pretrained models. Columns: registers in the order the
    members' mixtures first name them, then any other register, then ``all``. Missing cells are NaN.

    Raises:
        ValueError: if the matrix is empty or has more than one row per (model, register).
    """
    _require(matrix, "performance")
    _check_unique(matrix, ["model", "register"], "performance")
    members, pretrained = _models(matrix)
    rows = members + pretrained
    named: list[str] = []
    if "mixture" in matrix.columns:
        for text in matrix.filter(pl.col("model").is_in(members)).unique("model", maintain_order=True)["mixture"]:
            named += [register for register in _mixture(text) if register not in named]
    present = [register for register in matrix["register"].unique(maintain_order=True) if register != "all"]
    columns = [r for r in named if r in present] + [r for r in present if r not in named]
    columns += ["all"] if "all" in set(matrix["register"]) else []
    values = np.full((len(rows), len(columns)), np.nan)
    index = {model: i for i, model in enumerate(rows)}
    place = {register: j for j, register in enumerate(columns)}
    for model, register, value in matrix.select("model", "register", measure).iter_rows():
        values[index[model], place[register]] = np.nan if value is None else value
    return rows, columns, values


def own_registers(matrix: pl.DataFrame, rows: list[str], columns: list[str]) -> np.ndarray:
    """Boolean grid like :func:`performance_grid`'s: True where a member's mixture gives the register weight > 0."""
    own = np.zeros((len(rows), len(columns)), dtype=bool)
    if "mixture" not in matrix.columns:
        return own
    mixtures = dict(matrix.select("model", "mixture").unique("model", maintain_order=True).iter_rows())
    for i, model in enumerate(rows):
        weights = _mixture(mixtures.get(model))
        for j, register in enumerate(columns):
            own[i, j] = weights.get(register, 0.0) > 0
    return own


def _cell_texts(matrix: pl.DataFrame, rows: list[str], columns: list[str], values: np.ndarray) -> np.ndarray:
    """Each heat-map cell's text: the value, and its 95 % interval below it when the matrix has one."""
    texts = np.array([[f"{v:.2f}" if np.isfinite(v) else "" for v in line] for line in values], dtype=object)
    if not {BPB_LOW, BPB_HIGH} <= set(matrix.columns):
        return texts
    _, _, low = performance_grid(matrix, BPB_LOW)
    _, _, high = performance_grid(matrix, BPB_HIGH)
    for i, j in zip(*np.nonzero(np.isfinite(values) & np.isfinite(low) & np.isfinite(high)), strict=True):
        texts[i, j] = f"{values[i, j]:.2f}\n[{low[i, j]:.2f}, {high[i, j]:.2f}]"
    return texts


def plot_family_performance(matrix: pl.DataFrame, pdf: Path, png: Path, title: str) -> None:
    """Bits per byte of every model on every register's test documents; each member's own registers outlined.

    Where the matrix has ``bits_per_byte_ci_low``/``_ci_high`` (a document bootstrap), each cell gives the
    interval below its value.
    """
    apply_style()
    rows, columns, values = performance_grid(matrix)
    texts = _cell_texts(matrix, rows, columns, values)
    intervals = any("\n" in text for text in texts.ravel())
    own = own_registers(matrix, rows, columns)
    members, _ = _models(matrix)
    labels = columns
    if "documents" in matrix.columns:
        documents = dict(matrix.group_by("register").agg(pl.col("documents").max()).iter_rows())
        labels = [f"{register}\n({documents[register]} docs)" for register in columns]
    scale = 1.4 if intervals else 1.0
    figure, axis = plt.subplots(figsize=(scale * len(columns) + 3.0, scale * 0.42 * len(rows) + 1.8))
    sns.heatmap(
        values, ax=axis, annot=texts, fmt="", annot_kws={"fontsize": 6.5 if intervals else 7}, cmap="rocket_r",
        mask=np.isnan(values),
        xticklabels=labels, yticklabels=rows, linewidths=0.5, linecolor="white",
        cbar_kws={"label": "bits per byte (lower is better)"},
    )  # fmt: skip
    for i, j in zip(*np.nonzero(own), strict=True):
        axis.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="#0173b2", linewidth=2.2, clip_on=False))
    if 0 < len(members) < len(rows):
        axis.axhline(len(members), color="white", linewidth=5)
    if columns and columns[-1] == "all" and len(columns) > 1:
        axis.axvline(len(columns) - 1, color="white", linewidth=5)
    axis.tick_params(axis="x", labelsize=7, rotation=0)
    axis.tick_params(axis="y", labelsize=8, rotation=0)
    axis.set(xlabel="register of the test documents", ylabel="")
    below = f", {_count(len(rows) - len(members), 'pretrained model')} below" if len(rows) > len(members) else ""
    bracket = "; [95 % document-bootstrap interval]" if intervals else ""
    axis.set_title(
        f"{_count(len(members), 'member')} (outlined: in the member's training mixture){below}{bracket}", fontsize=8
    )
    figure.suptitle(f"Bits per byte by register — {title}")
    figure.tight_layout()
    save_figure(figure, pdf, png, title)


# -- training curves -------------------------------------------------------------------------------------------


def plot_training_curves(losses: pl.DataFrame, pdf: Path, png: Path, title: str) -> None:
    """Training loss (thin) and validation loss (markers) against tokens seen, per member; right: the second half."""
    apply_style()
    _require(losses, "training-loss")
    members, _ = _models(losses)
    colours = _member_colours(members)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    half = losses["tokens"].max() / 2
    for axis, data in zip(axes, (losses, losses.filter(pl.col("tokens") >= half)), strict=True):
        for model in members:
            rows = data.filter(pl.col("model") == model).sort("step")
            train = rows.filter(pl.col("train_loss").is_not_null())
            axis.plot(train["tokens"], train["train_loss"], color=colours[model], linewidth=0.6, alpha=0.35)
            valid = rows.filter(pl.col("validation_loss").is_not_null())
            axis.plot(
                valid["tokens"], valid["validation_loss"], color=colours[model], marker="o", markersize=3,
                linewidth=1.4, label=model,
            )  # fmt: skip
        axis.set(xlabel="tokens seen", ylabel="loss [nats per token]")
    evaluations = losses.filter(pl.col("validation_loss").is_not_null()).group_by("model").len()["len"]
    axes[0].set_title("whole run", fontsize=9)
    axes[1].set_title("second half of the run", fontsize=9)
    validation = _n_text(evaluations, "validation points per member") if len(evaluations) else "no validation"
    figure.suptitle(
        f"Training (thin) and validation (markers) loss, {_count(len(members), 'member')}, {validation} — {title}"
    )
    figure.tight_layout()
    handles = [Line2D([], [], color=colours[m], marker="o", markersize=3, label=m) for m in members]
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7)
    save_figure(figure, pdf, png, title)


# -- geometry and lenses by depth ------------------------------------------------------------------------------


def _raw_all(geometry: pl.DataFrame) -> pl.DataFrame:
    """Raw states (no post-processing) over all registers: the rows the family figures compare."""
    _require(geometry, "geometry")
    _single(geometry, ("corpus",), "geometry")
    data = geometry.filter((pl.col("register") == "all") & (pl.col("processing") == "none"))
    if data.is_empty():
        raise ValueError("the geometry table has no rows for register 'all' with processing 'none'")
    return data


def _label(metric: str) -> str:
    """A metric's axis label."""
    return FAMILY_METRIC_LABELS.get(metric) or METRIC_LABELS.get(metric, metric)


def plot_family_geometry(
    geometry: pl.DataFrame, pdf: Path, png: Path, title: str, metrics: tuple[str, ...] = DEFAULT_METRICS
) -> None:
    """One panel per geometry metric by relative depth (raw states, all registers), one line per model."""
    apply_style()
    data = _raw_all(geometry)
    names = _present(data, metrics)
    if not names:
        raise ValueError(f"the geometry table has none of the metrics {', '.join(metrics)}")
    _check_unique(data, ["model", "metric", "layer"], "geometry")
    members, pretrained = _models(data)
    styles = _line_styles(members, pretrained)
    figure, axes = _grid(len(names))
    documents: set[int] = set()
    for axis, metric in zip(axes, names, strict=False):
        rows = data.filter(pl.col("metric") == metric)
        _depth_lines(axis, rows, styles)
        documents |= _depth_bands(axis, rows, styles, "documents")
        axis.set(title=_label(metric), xlabel=_DEPTH_LABEL, ylabel="", xlim=(-0.02, 1.02))
    figure.suptitle(
        f"Geometry by relative depth, raw states, {_count(len(members), 'member')} and "
        f"{_count(len(pretrained), 'pretrained model')} ({_n_text(data['n'], 'states per point')}"
        f"{_band_text(documents, 'documents')}) — {title}"
    )
    figure.tight_layout()
    _model_legend(figure, styles)
    save_figure(figure, pdf, png, title)


def plot_family_lenses(lenses: pl.DataFrame, pdf: Path, png: Path, title: str) -> None:
    """Lens metrics (logit and tuned KL to the final distribution, cross-entropy, …) by relative depth, per model."""
    apply_style()
    _require(lenses, "lens")
    _single(lenses, ("corpus", "split"), "lens")
    available = set(lenses.select("lens", "metric").unique().iter_rows())
    panels = [panel for panel in LENS_PANELS if panel[:2] in available]
    if not panels:
        wanted = ", ".join(f"{lens}/{metric}" for lens, metric, _, _ in LENS_PANELS)
        raise ValueError(f"the lens table has none of the (lens, metric) pairs {wanted}")
    _check_unique(lenses, ["model", "lens", "metric", "layer"], "lens")
    members, pretrained = _models(lenses)
    styles = _line_styles(members, pretrained)
    figure, axes = _grid(len(panels), columns=2 if len(panels) in (2, 4) else 3)
    documents: set[int] = set()
    for axis, (lens, metric, label, scale) in zip(axes, panels, strict=False):
        rows = lenses.filter((pl.col("lens") == lens) & (pl.col("metric") == metric))
        _depth_lines(axis, rows, styles)
        documents |= _depth_bands(axis, rows, styles, "n")
        axis.set(title=f"{lens} lens", xlabel=_DEPTH_LABEL, ylabel=label, xlim=(-0.02, 1.02))
        if scale == "symlog":  # KL is 0 at the last layer for the logit and tuned lenses: keep it on the axis
            axis.set_yscale("symlog", linthresh=1e-2)
            axis.set_ylim(bottom=0)
        else:
            axis.set_yscale(scale)
    figure.suptitle(
        f"Lenses by relative depth, {_count(len(members), 'member')} and "
        f"{_count(len(pretrained), 'pretrained model')} ({_n_text(lenses['n_tokens'], 'tokens')}"
        f"{_band_text(documents, 'documents')}) — {title}"
    )
    figure.tight_layout()
    _model_legend(figure, styles)
    save_figure(figure, pdf, png, title)


# -- geometry against performance ------------------------------------------------------------------------------


def _family_relation_title(relations: pl.DataFrame, metric: str, points: int) -> str:
    """Spearman's ρ across models and the number of models behind it, said plainly."""
    rows = relations.filter(
        (pl.col("level") == "models") & (pl.col("metric") == metric) & (pl.col("processing") == "none")
        & (pl.col("band") == RELATION_BAND) & (pl.col("measure") == "bits_per_byte")
    )  # fmt: skip
    label = _label(metric)
    if rows.is_empty():
        return f"{label}\nρ not computed (n = {points} models plotted)"
    rho, n = rows["spearman"][0], int(rows["n"][0])
    if rho is None or not np.isfinite(rho):
        return f"{label}\nn = {n}, too few points"
    low, high = (rows[c][0] if c in rows.columns else None for c in ("ci_low", "ci_high"))
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{label}\nSpearman ρ = {rho:+.2f} (n = {n} models, no interval)"
    return f"{label}\nSpearman ρ = {rho:+.2f} [{low:+.2f}, {high:+.2f}] (n = {n} models)"


def plot_family_relations(
    geometry: pl.DataFrame,
    matrix: pl.DataFrame,
    relations: pl.DataFrame,
    pdf: Path,
    png: Path,
    title: str,
    metrics: tuple[str, ...] = RELATION_METRICS,
) -> None:
    """Late-band geometry (raw states, all registers) against bits per byte over all documents, one point per model."""
    apply_style()
    data = _raw_all(geometry)
    _require(matrix, "performance")
    bounds = [column for column in (BPB_LOW, BPB_HIGH) if column in matrix.columns]
    scores = matrix.filter(pl.col("register") == "all").select("model", "bits_per_byte", *bounds)
    if scores.is_empty():
        raise ValueError("the performance table has no rows for register 'all'")
    bands = band_means(data).filter(pl.col("band") == RELATION_BAND)
    points = bands.join(scores, on="model", how="inner")
    names = _present(points, metrics) if not points.is_empty() else []
    if not names:
        raise ValueError(
            f"no model has both {RELATION_BAND}-band geometry for any of {', '.join(metrics)} and bits per byte"
        )
    members, pretrained = _models(matrix.filter(pl.col("model").is_in(points["model"].to_list())))
    colours = _member_colours(members)
    figure, axes = _grid(len(names), columns=min(len(names), 3), size=(4.4, 3.6))
    for axis, metric in zip(axes, names, strict=False):
        subset = points.filter(pl.col("metric") == metric)
        for model, x, y, *interval in subset.select("model", "value", "bits_per_byte", *bounds).iter_rows():
            if len(interval) == 2 and None not in interval:  # bits per byte's document-bootstrap interval
                draw_interval(axis, [x], [interval[0]], [interval[1]], colours.get(model, "black"), kind="bars",
                              estimate=[y])  # fmt: skip
            if model in colours:
                axis.scatter(x, y, s=40, color=colours[model], edgecolor="white", zorder=3)
            else:
                marker = _PRETRAINED_MARKERS[pretrained.index(model) % len(_PRETRAINED_MARKERS)]
                axis.scatter(x, y, s=45, color="black", marker=marker, zorder=3)
            axis.annotate(model, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
        axis.set(
            title=_family_relation_title(relations, metric, len(subset)),
            xlabel=f"{_label(metric)} ({RELATION_BAND} layers)",
            ylabel="bits per byte (all registers)",
        )
        axis.title.set_fontsize(9)
        axis.margins(x=0.15, y=0.1)  # room for the names
    black = f", {_count(len(pretrained), 'pretrained model')} in black" if pretrained else ""
    figure.suptitle(
        f"Geometry and performance, one point per model ({_count(len(members), 'member')} in colour{black}) — {title}"
    )
    figure.tight_layout()
    save_figure(figure, pdf, png, title)
