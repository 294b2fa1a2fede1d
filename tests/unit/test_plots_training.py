"""Figures of a trained family: synthetic tables, files written, the heat-map's grid read back exactly."""

import json

import numpy as np
import polars as pl
import pytest

from latent_atlas.geometry.relations import relate
from latent_atlas.plots.training import (
    own_registers,
    performance_grid,
    plot_family_geometry,
    plot_family_lenses,
    plot_family_performance,
    plot_family_relations,
    plot_training_curves,
)

MIXTURES = {
    "fam-narrative": {"narrative": 1.0},
    "fam-how_to": {"how_to": 1.0},
    "fam-uniform": {"how_to": 0.5, "narrative": 0.5},
    "fam-minus-narrative": {"how_to": 1.0},
}
PRETRAINED = ("SmolLM2-135M", "gemma-3-270m")
REGISTERS = ("news", "narrative", "how_to", "all")


def _bpb(model: str, register: str) -> float:
    return 1.0 + 0.1 * [*MIXTURES, *PRETRAINED].index(model) + 0.01 * REGISTERS.index(register)


def _matrix(pretrained: tuple[str, ...] = PRETRAINED) -> pl.DataFrame:
    models = [*pretrained[:1], *MIXTURES, *pretrained[1:]]  # a pretrained model first: members must still lead
    rows = [
        {
            "model": model,
            "kind": "member" if model in MIXTURES else "pretrained",
            "mixture": json.dumps(MIXTURES[model], sort_keys=True) if model in MIXTURES else None,
            "register": register,
            "documents": 30 if register != "all" else 90,
            "tokens": 1000,
            "bytes": 4000,
            "nll": 2000.0,
            "perplexity": 7.0,
            "bits_per_token": 2.8,
            "bits_per_byte": _bpb(model, register),
        }
        for model in models
        for register in REGISTERS
    ]
    return pl.DataFrame(rows)


def _kind(model: str) -> str:
    return "member" if model in MIXTURES else "pretrained"


def _geometry(models: tuple[str, ...] = (*MIXTURES, *PRETRAINED)) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = [
        {"layer": layer, "register": register, "processing": processing, "metric": metric,
         "value": float(rng.normal() + index), "n": 256, "relative_depth": layer / depth, "model": model,
         "corpus": "c", "kind": _kind(model)}
        for index, model in enumerate(models)
        for depth in [4 if model in MIXTURES else 6]
        for layer in range(depth + 1)
        for register in ("all", "news")
        for processing in ("none", "center")
        for metric in ("mean_cosine", "isoscore", "twonn")
    ]  # fmt: skip
    return pl.DataFrame(rows)


def _losses() -> pl.DataFrame:
    rows = [
        {"model": model, "step": step, "tokens": step * 512, "lr": 1e-3, "train_loss": 8.0 / (1 + step) + 3,
         "grad_norm": 1.0, "validation_loss": 8.0 / (1 + step) + 3.1 if step % 5 == 0 else None, "seconds": 0.1}
        for model in MIXTURES
        for step in range(21)
    ]  # fmt: skip
    return pl.DataFrame(rows)


def _lenses(lenses: tuple[str, ...] = ("logit", "tuned")) -> pl.DataFrame:
    rows = [
        {"model": model, "corpus": "c", "split": "heldout", "lens": lens, "address": f"resid.{layer:02d}",
         "layer": layer, "metric": metric, "value": float(4 - layer) if metric != "ce_next_token" else 5.0 - layer,
         "n_tokens": 512, "relative_depth": layer / 4, "kind": _kind(model)}
        for model in (*MIXTURES, PRETRAINED[0])
        for lens in lenses
        for layer in range(5)
        for metric in ("kl_to_final", "ce_next_token")
    ]  # fmt: skip
    return pl.DataFrame(rows)


def _written(tmp_path, name):
    pdf, png = tmp_path / f"{name}.pdf", tmp_path / f"{name}.png"
    return pdf, png


def _check(pdf, png):
    assert pdf.read_bytes()[:4] == b"%PDF"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_performance_grid_puts_members_first_and_reads_the_values_back():
    matrix = _matrix()
    rows, columns, values = performance_grid(matrix)
    assert rows == [*MIXTURES, *PRETRAINED]
    assert columns == ["narrative", "how_to", "news", "all"]  # named by the mixtures first, then the rest, all last
    expected = np.array([[_bpb(model, register) for register in columns] for model in rows])
    np.testing.assert_array_equal(values, expected)
    own = own_registers(matrix, rows, columns)
    np.testing.assert_array_equal(
        own,
        [[True, False, False, False], [False, True, False, False], [True, True, False, False],
         [False, True, False, False], [False] * 4, [False] * 4],
    )  # fmt: skip


def test_performance_grid_leaves_missing_cells_empty_and_refuses_duplicates():
    matrix = _matrix(pretrained=()).filter(~((pl.col("model") == "fam-how_to") & (pl.col("register") == "news")))
    rows, columns, values = performance_grid(matrix)
    assert rows == list(MIXTURES)
    assert np.isnan(values[rows.index("fam-how_to"), columns.index("news")])
    assert np.isfinite(values).sum() == values.size - 1
    with pytest.raises(ValueError, match="several rows"):
        performance_grid(pl.concat([matrix, matrix.head(1)]))


def test_family_figures_are_drawn(tmp_path):
    matrix, geometry = _matrix(), _geometry()
    relations = relate(geometry, matrix.select("model", "register", "bits_per_byte", "perplexity"))
    draws = {
        "performance": lambda p, q: plot_family_performance(matrix, p, q, "fam"),
        "members-only": lambda p, q: plot_family_performance(_matrix(pretrained=()), p, q, "fam"),
        "curves": lambda p, q: plot_training_curves(_losses(), p, q, "fam"),
        "geometry": lambda p, q: plot_family_geometry(geometry, p, q, "fam"),
        "lenses": lambda p, q: plot_family_lenses(_lenses(), p, q, "fam"),
        "logit-only": lambda p, q: plot_family_lenses(_lenses(("logit",)), p, q, "fam"),
        "relations": lambda p, q: plot_family_relations(geometry, matrix, relations, p, q, "fam"),
    }
    for name, draw in draws.items():
        pdf, png = _written(tmp_path, name)
        draw(pdf, png)
        _check(pdf, png)


def test_family_figures_cope_with_no_pretrained_model_and_too_few_points(tmp_path):
    members = _geometry(models=tuple(MIXTURES)[:2])
    matrix = _matrix(pretrained=()).filter(pl.col("model").is_in(list(MIXTURES)[:2]))
    relations = relate(members, matrix.select("model", "register", "bits_per_byte", "perplexity"))
    assert relations.filter(pl.col("level") == "models")["spearman"].is_nan().all()  # two points: no ρ
    pdf, png = _written(tmp_path, "few")
    plot_family_relations(members, matrix, relations, pdf, png, "fam")
    _check(pdf, png)
    pdf, png = _written(tmp_path, "geometry")
    plot_family_geometry(members, pdf, png, "fam", metrics=("twonn", "effective_rank"))
    _check(pdf, png)


def test_empty_tables_are_refused(tmp_path):
    pdf, png = _written(tmp_path, "empty")
    matrix, geometry = _matrix(), _geometry()
    relations = relate(geometry, matrix.select("model", "register", "bits_per_byte", "perplexity"))
    for draw in (
        lambda: plot_family_performance(matrix.clear(), pdf, png, "fam"),
        lambda: plot_training_curves(_losses().clear(), pdf, png, "fam"),
        lambda: plot_family_geometry(geometry.clear(), pdf, png, "fam"),
        lambda: plot_family_lenses(_lenses().clear(), pdf, png, "fam"),
        lambda: plot_family_relations(geometry.clear(), matrix, relations, pdf, png, "fam"),
        lambda: plot_family_relations(geometry, matrix.clear(), relations, pdf, png, "fam"),
    ):
        with pytest.raises(ValueError, match="empty"):
            draw()
    assert not pdf.exists() and not png.exists()


def test_absent_metrics_and_mixed_corpora_are_refused(tmp_path):
    pdf, png = _written(tmp_path, "bad")
    geometry = _geometry()
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_family_geometry(geometry, pdf, png, "fam", metrics=("effective_rank",))
    with pytest.raises(ValueError, match="none of the"):
        plot_family_lenses(_lenses().with_columns(metric=pl.lit("entropy")), pdf, png, "fam")
    mixed = pl.concat([geometry, geometry.with_columns(corpus=pl.lit("other"))])
    with pytest.raises(ValueError, match="several values of corpus"):
        plot_family_geometry(mixed, pdf, png, "fam")
