"""The steering summary table (intervals over prompts, items and targets), ITI's per-item margins, and the
steering figures drawn from the summary (legend names only what ran)."""

import math

import numpy as np
import polars as pl
import pytest

from latent_atlas.steering.summary import (
    DIFFERENCE,
    GEOMETRIC_MEAN,
    MEAN,
    RATIO,
    SUMMARY_SCHEMA,
    generation_summary,
    iti_items,
    iti_summary,
    steering_summary,
)
from tests.unit.test_claims_steering import _iti, _paired_mean, _sweep
from tests.unit.test_iti import iti_setup  # noqa: F401  (the fixture)


def _row(summary: pl.DataFrame, coefficient: float, measure: str, statistic: str) -> dict:
    rows = summary.filter(
        pl.col("coefficient") == coefficient, pl.col("measure") == measure, pl.col("statistic") == statistic
    )
    assert rows.height == 1
    return rows.row(0, named=True)


def test_generation_summary_means_ratios_and_paired_changes_match_direct_computations():
    table = _sweep({2.0: (0.2, 0.3), 4.0: (0.5, 1.0)}, prompts=10).with_columns(method=pl.lit("actadd"))
    summary = generation_summary(table)
    for c in (0.0, 2.0, 4.0):
        rows = table.filter(pl.col("coefficient") == c)
        level = _row(summary, c, "sentiment", MEAN)
        assert level["estimate"] == pytest.approx(rows["sentiment"].mean())
        assert level["n"] == 10 and level["unit"] == "prompt"
        assert level["ci_low"] <= level["estimate"] <= level["ci_high"]
        geometric = _row(summary, c, "perplexity", GEOMETRIC_MEAN)
        assert geometric["estimate"] == pytest.approx(math.exp(np.log(rows["perplexity"].to_numpy()).mean()))
        assert level["off_target_kl"] == pytest.approx(c / 10)
    change = _row(summary, 4.0, "sentiment", DIFFERENCE)
    assert change["estimate"] == pytest.approx(_paired_mean(table, "sentiment", 4.0))
    assert change["ci_low"] > 0.4 and change["ci_high"] < 0.6  # pairing removes the prompts' wide spread
    ratio = _row(summary, 4.0, "perplexity", RATIO)
    logged = table.with_columns(pl.col("perplexity").log())
    assert ratio["estimate"] == pytest.approx(math.exp(_paired_mean(logged, "perplexity", 4.0)))
    assert summary.filter(pl.col("coefficient") == 0, pl.col("statistic") == DIFFERENCE).height == 0


def test_samples_of_one_prompt_are_one_unit():
    """Every prompt's continuation repeated as four identical samples: same n and the same interval."""
    one = _sweep({4.0: (0.3, 0.0)}, prompts=8, decodings=("sampled",)).with_columns(method=pl.lit("actadd"))
    four = pl.concat([one.with_columns(sample=pl.lit(s, pl.Int64)) for s in range(4)])
    single, repeated = (generation_summary(t.with_columns(pl.col("sample").cast(pl.Int64))) for t in (one, four))
    assert single.select("n", "ci_low", "ci_high").equals(repeated.select("n", "ci_low", "ci_high"))
    assert set(repeated["n"]) == {8}


def test_iti_items_and_summary_resample_items_paired_across_strengths():
    base = np.array([1.0] * 30 + [-1.0] * 20)
    better = base.copy()
    better[30:40] = 2.0
    table = _iti(base, {5.0: (better, 0.2)})
    items = iti_items(table)
    assert items.height == 100 and set(items["item"]) == set(range(50))
    summary = iti_summary(table)
    assert _row(summary, 0.0, "truth_accuracy", MEAN)["estimate"] == pytest.approx(0.6)
    assert _row(summary, 5.0, "truth_accuracy", MEAN)["estimate"] == pytest.approx(0.8)
    change = _row(summary, 5.0, "truth_accuracy", DIFFERENCE)
    assert change["estimate"] == pytest.approx(0.2) and change["n"] == 50 and change["unit"] == "statement item"
    assert _row(summary, 5.0, "truth_accuracy", MEAN)["off_target_kl"] == pytest.approx(0.2)
    old = iti_summary(table.drop("test_item_margins"))
    assert old["ci_low"].is_nan().all() and old["estimate"].to_list() == pytest.approx([0.6, 0.8])


def test_the_summary_table_has_every_method_in_one_schema():
    generation = _sweep({2.0: (0.1, 0.1)}, prompts=5).with_columns(method=pl.lit("actadd"))
    optimised = pl.DataFrame({"target_id": [0, 1, 2, 3], "layer": 10, "exact_match": [True, True, False, True],
                              "bleu": [100.0, 100.0, 50.0, 100.0]})  # fmt: skip
    tables = {"actadd": generation, "iti": _iti(np.array([1.0, -1.0, 1.0]), {5.0: (np.ones(3), 0.1)}),
              "optimised": optimised}  # fmt: skip
    summary = steering_summary(tables)
    assert summary.schema == pl.Schema(SUMMARY_SCHEMA)
    assert set(summary["method"]) == {"actadd", "iti", "optimised"}
    recovery = summary.filter(pl.col("measure") == "exact_recovery").row(0, named=True)
    assert recovery["estimate"] == pytest.approx(0.75) and recovery["n"] == 4 and recovery["unit"] == "target sentence"
    bleu = summary.filter(pl.col("measure") == "bleu")["estimate"][0]
    assert bleu == pytest.approx(87.5)


def test_the_effect_legend_names_only_what_ran(monkeypatch, tmp_path):
    import latent_atlas.plots.steering as plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, *args: drawn.__setitem__("figure", figure))
    table = _sweep({2.0: (0.2, 0.1), 4.0: (0.3, 0.2)}, prompts=6).with_columns(method=pl.lit("actadd"))
    plots.plot_effect(table, tmp_path / "e.pdf", tmp_path / "e.png", "tiny")
    top = drawn["figure"].axes[0]
    assert [text.get_text() for text in top.get_legend().get_texts()] == ["resid.06"]
    assert "greedy decoding" in drawn["figure"]._suptitle.get_text()
    assert "n = 6 prompts" in drawn["figure"]._suptitle.get_text()
    both = _sweep({2.0: (0.2, 0.1)}, prompts=6, decodings=("greedy", "sampled"), samples=2)
    plots.plot_effect(both.with_columns(method=pl.lit("actadd")), tmp_path / "e.pdf", tmp_path / "e.png", "tiny")
    labels = [text.get_text() for text in drawn["figure"].axes[0].get_legend().get_texts()]
    assert labels == ["resid.06 · greedy", "resid.06 · sampled"]


def test_steering_figures_draw_from_a_summary(tmp_path):
    from latent_atlas.plots.steering import plot_effect, plot_frontier, plot_iti

    generation = pl.concat(
        [_sweep({2.0: (0.2, 0.1), 8.0: (0.1, 2.0)}, prompts=6, layer=layer) for layer in (4, 6)]
    ).with_columns(method=pl.lit("mean_difference"))
    iti = _iti(np.array([1.0, -1.0] * 10), {5.0: (np.ones(20), 0.1)})
    summary = steering_summary({"mean_difference": generation, "iti": iti})
    probes = pl.DataFrame({"layer": [1, 1, 2, 2], "head": [0, 1, 0, 1], "test_accuracy": [0.5, 0.9, 0.6, 0.7],
                           "shuffled_test_accuracy": [0.5] * 4, "selected": [False, True, False, False],
                           "validation_statements": [4] * 4, "test_statements": [16] * 4})  # fmt: skip
    for name, draw in {
        "effect": lambda p, q: plot_effect(generation, p, q, "tiny", summary),
        "frontier": lambda p, q: plot_frontier(generation, p, q, "tiny", summary),
        "iti": lambda p, q: plot_iti(iti, probes, p, q, "tiny", summary),
    }.items():
        draw(tmp_path / f"{name}.pdf", tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name


def test_run_iti_keeps_each_test_items_margin(iti_setup):  # noqa: F811
    from latent_atlas.steering.data import load_statements
    from latent_atlas.steering.generate import continuation_log_probs
    from latent_atlas.steering.pipeline import run_iti
    from latent_atlas.store import ActivationStore

    loaded, root, data = iti_setup
    statements = load_statements(root / "facts.csv", 0.4, 0.2, seed=0)
    with ActivationStore(root / "s.h5") as store:
        table, _ = run_iti(loaded, statements, data, {"iti": {"strengths": [0, 8], "heads": 3}}, store)
    test = statements.select("test")
    margins = []
    for prompt, true, false in zip(test.prompts, test.true_objects, test.false_objects, strict=True):
        ids = loaded.tokenizer(prompt)["input_ids"]
        objects = [loaded.tokenizer(f" {o}", add_special_tokens=False)["input_ids"] for o in (true, false)]
        true_lp, false_lp = continuation_log_probs(loaded, ids, objects)
        margins.append(float(true_lp.sum() - false_lp.sum()))
    kept = table.sort("coefficient")["test_item_margins"].to_list()
    assert len(kept) == 2 and all(len(row) == len(test.prompts) for row in kept)
    assert kept[0] == pytest.approx(margins, abs=1e-4)  # α = 0: the unsteered model's margins, item by item
    for row in table.iter_rows(named=True):
        assert row["test_truth_accuracy"] == pytest.approx(np.mean(np.array(row["test_item_margins"]) > 0))


def test_horizontal_bars_span_the_x_interval_at_their_height():
    import matplotlib.pyplot as plt

    from latent_atlas.plots import draw_interval

    figure, axis = plt.subplots()
    draw_interval(axis, [1.0, 2.0], [2.0, np.nan], [5.0, 7.0], "k", kind="bars", estimate=[3.0, 6.0], horizontal=True)
    (segments,) = [c.get_segments() for c in axis.collections if len(c.get_segments())]
    assert [s.tolist() for s in segments] == [[[2.0, 1.0], [5.0, 1.0]]]  # the NaN interval draws nothing
    plt.close(figure)
