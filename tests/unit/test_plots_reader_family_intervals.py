"""The readers' and the family's figures carry their intervals (what they summarise, and that they draw)."""

import numpy as np
import polars as pl
import pytest

from latent_atlas.evaluation import evaluate_corpus
from latent_atlas.plots.readers import method_summary, plot_clustering
from latent_atlas.plots.training import _cell_texts, performance_grid
from latent_atlas.training.evaluate import evaluate_documents

ITEMS = [f"d{i}" for i in range(20)]


def _clustering() -> pl.DataFrame:
    right = [True] * 20
    half = [i < 10 for i in range(20)]
    rows = [
        ("clustering_gt_only", "template", 0, right),
        ("clustering_gt_only", "template", 1, half),
        ("in_context", "template", 0, half),
        ("knn_prompting", "template", None, half),
    ]
    return pl.DataFrame(
        [{"task": "t", "method": m, "input": i, "seed": s, "balanced_accuracy": float(np.mean(c)),
          "accuracy": float(np.mean(c)), "macro_f1": 0.5, "n_classes": 2, "n_test": 20, "split_hash": "h",
          "doc_id": ITEMS, "correct": c} for m, i, s, c in rows]
    )  # fmt: skip


def test_method_summary_gives_item_bootstrap_accuracy():
    row = method_summary(_clustering()).filter(pl.col("method") == "clustering_gt_only").row(0, named=True)
    # 20 items right with seed 0, the first 10 with seed 1: 30 of 40 predictions, 20 items resampled
    assert row["accuracy"] == pytest.approx(0.75) and row["n"] == 20 and row["unit"] == "test item"
    assert row["ci_low"] < 0.75 < row["ci_high"]


def test_clustering_figure_with_items_draws_error_bars(tmp_path):
    plot_clustering(_clustering(), tmp_path / "c.pdf", tmp_path / "c.png", "m")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_heat_map_cells_carry_their_interval():
    matrix = pl.DataFrame(
        {"model": ["a", "a"], "register": ["x", "all"], "bits_per_byte": [2.0, 2.5],
         "bits_per_byte_ci_low": [1.9, None], "bits_per_byte_ci_high": [2.1, None]}
    )  # fmt: skip
    rows, columns, values = performance_grid(matrix)
    texts = _cell_texts(matrix, rows, columns, values)
    assert texts[0, columns.index("x")] == "2.00\n[1.90, 2.10]"
    assert texts[0, columns.index("all")] == "2.50"  # no interval: the value alone


def test_evaluate_documents_rows_add_up_to_the_corpus_summary(tiny_loaded, tiny_corpus):
    summary, documents = evaluate_documents(tiny_loaded, tiny_corpus, "any", max_length=16)
    reference = evaluate_corpus(tiny_loaded, tiny_corpus, None, max_length=16)
    assert documents.height == tiny_corpus.height and documents["doc_id"].to_list() == tiny_corpus["doc_id"].to_list()
    totals = documents.group_by("register").agg(pl.col("nll").sum(), pl.col("bytes").sum())
    for register, nll, size in totals.iter_rows():
        row = reference.filter(pl.col("register") == register).row(0, named=True)
        assert (nll, size) == pytest.approx((row["nll"], row["bytes"]))
        assert summary.filter(pl.col("register") == register)["bits_per_byte"][0] == pytest.approx(row["bits_per_byte"])
    assert documents["bits_per_byte"].to_list() == pytest.approx(
        (documents["nll"] / (np.log(2) * documents["bytes"])).to_list()
    )
