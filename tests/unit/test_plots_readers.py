"""The readers' figures: what they summarise, and that each writes a PDF and a PNG."""

import polars as pl
import pytest

from latent_atlas.plots.readers import (
    condition_summary,
    method_summary,
    plot_clustering,
    plot_descriptions,
    plot_elm,
    plot_paths,
)


def _clustering() -> pl.DataFrame:
    rows = [
        {"method": "clustering_gt_only", "input": "template", "seed": 0, "balanced_accuracy": 0.6, "macro_f1": 0.5},
        {"method": "clustering_gt_only", "input": "template", "seed": 1, "balanced_accuracy": 0.8, "macro_f1": 0.7},
        {"method": "clustering_gt_only", "input": "raw", "seed": 0, "balanced_accuracy": 0.5, "macro_f1": 0.5},
        {"method": "clustering_gt_only", "input": "raw", "seed": 1, "balanced_accuracy": 0.5, "macro_f1": 0.5},
        {"method": "linear_probe", "input": "raw", "seed": None, "balanced_accuracy": 0.9, "macro_f1": 0.9},
        {"method": "zero_shot", "input": "template", "seed": None, "balanced_accuracy": 0.5, "macro_f1": 0.4},
        {"method": "lora", "input": "template", "seed": 0, "balanced_accuracy": 0.7, "macro_f1": 0.6},
    ]
    return pl.DataFrame(rows).with_columns(
        task=pl.lit("t"), n_classes=pl.lit(2), n_test=pl.lit(10), split_hash=pl.lit("abc")
    )


def _evaluation() -> pl.DataFrame:
    rows = []
    for condition, nll, correct in (("true", 1.0, True), ("shuffled", 2.0, False), ("none", 3.0, False)):
        for doc in ("d1", "d2"):
            rows.append(
                {
                    "doc_id": doc,
                    "label": "narrative",
                    "condition": condition,
                    "reconstruction_nll": nll + (0.5 if doc == "d2" else 0.0),
                    "register_correct": correct,
                    "consistency": None,
                    "reference": "It was a dark night",
                    "reconstruction_generated": "It was night",
                    "register_predicted": "narrative" if correct else None,
                }
            )
    return pl.DataFrame(rows, schema_overrides={"consistency": pl.Float64})


def test_method_summary_averages_seeds_per_input_in_the_figures_order():
    summary = method_summary(_clustering())
    keys = list(zip(summary["method"], summary["input"], strict=True))
    assert keys == [
        ("clustering_gt_only", "raw"),
        ("clustering_gt_only", "template"),
        ("zero_shot", "template"),
        ("linear_probe", "raw"),
        ("lora", "template"),
    ]
    gt = summary.row(1, named=True)
    assert gt["mean"] == pytest.approx(0.7) and gt["std"] == pytest.approx(0.1414, abs=1e-4) and gt["runs"] == 2
    assert summary.row(0, named=True)["mean"] == pytest.approx(0.5)
    assert summary.filter(pl.col("method") == "linear_probe")["std"][0] == 0.0  # one run: no spread


def test_a_table_without_inputs_reads_as_raw_states_and_prompted_templates():
    legacy = _clustering().filter(pl.col("input") != "raw").drop("input")
    summary = method_summary(legacy)
    inputs = dict(zip(summary["method"], summary["input"], strict=True))
    assert inputs == {"clustering_gt_only": "raw", "zero_shot": "template", "lora": "template"}


def test_condition_summary_orders_true_shuffled_none():
    summary = condition_summary(_evaluation())
    assert summary["condition"].to_list() == ["true", "shuffled", "none"]
    assert summary["reconstruction_nll"].to_list() == pytest.approx([1.25, 2.25, 3.25])
    assert summary["register_accuracy"].to_list() == [1.0, 0.0, 0.0]


def test_every_figure_writes_pdf_and_png(tmp_path):
    losses = pl.DataFrame(
        {
            "step": [0, 1, 2],
            "examples_seen": [0, 4, 8],
            "train_loss": [None, 3.0, 2.0],
            "heldout_loss": [4.0, None, 2.5],
        },
    )
    paths = pl.DataFrame(
        {
            "kind": ["interpolation", "interpolation", "direction"],
            "position": [0.0, 1.0, 0.5],
            "from_doc": ["d1"] * 3,
            "to_doc": ["d2", "d2", "centroid"],
            "reconstruction_generated": ["a", "b", ""],
            "register_generated": [" story", " guide", " poem"],
            "register_predicted": ["narrative", "how_to", None],
        }
    )
    calls = {
        "clustering": lambda pdf, png: plot_clustering(_clustering(), pdf, png, "m"),
        "elm": lambda pdf, png: plot_elm(losses, _evaluation(), pdf, png, "m"),
        "descriptions": lambda pdf, png: plot_descriptions(_evaluation(), 2, pdf, png, "m"),
        "paths": lambda pdf, png: plot_paths(paths, pdf, png, "m"),
    }
    for name, call in calls.items():
        call(tmp_path / f"{name}.pdf", tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_empty_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the clustering table is empty"):
        plot_clustering(_clustering().clear(), tmp_path / "a.pdf", tmp_path / "a.png", "m")
    with pytest.raises(ValueError, match="the ELM paths table is empty"):
        plot_paths(pl.DataFrame(), tmp_path / "b.pdf", tmp_path / "b.png", "m")
