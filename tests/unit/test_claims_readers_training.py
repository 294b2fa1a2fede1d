"""The readers' and the family's claims: intervals over the right unit and verdicts on planted tables.

Expected values come from the planted design (closed forms: a constant per-item difference has a degenerate
interval at that value; a fair coin over n items has a 95 % interval of about ±1.96·√(0.25/n)).
"""

import math

import numpy as np
import polars as pl
import pytest

from latent_atlas.claims import readers as reader_claims
from latent_atlas.claims import training as training_claims
from latent_atlas.readers.uncertainty import accuracy_intervals, elm_controls, item_rows, paper_comparisons
from latent_atlas.training.evaluate import specialisation_intervals

ITEMS = [f"d{i:02d}" for i in range(30)]


def _config() -> dict:
    return {
        "run": {"models": ["m"], "corpora": ["registers", "debian"]},
        "readers": {
            "models": ["m"],
            "tasks": {
                "registers": {"corpus": "registers"},
                "sentiment": {"corpus": "sentiment"},
                "debian": {"corpus": "debian"},
            },
            "clustering": {"tasks": None},
            "elm": {"enabled": True, "task": "registers"},
        },
        "training": {"family": "fam", "analysis": {"corpus": None}},
    }


def _reader_rows(method: str, seed: int | None, correct: list[bool], read: str = "template") -> dict:
    return {"task": "t", "method": method, "input": read, "seed": seed, "accuracy": float(np.mean(correct)),
            "doc_id": ITEMS, "correct": correct}  # fmt: skip


def _readers(clustering: list[list[bool]], in_context: list[list[bool]], knn: list[bool]) -> pl.DataFrame:
    rows = [_reader_rows("clustering_gt_only", seed, c) for seed, c in enumerate(clustering)]
    rows += [_reader_rows("in_context", seed, c) for seed, c in enumerate(in_context)]
    rows += [_reader_rows("knn_prompting", None, knn), _reader_rows("knn_prompting", None, [True] * 30, "raw")]
    return pl.DataFrame(rows)


def _verdicts(claims: list) -> dict[str, str]:
    return {claim.detail: claim.verdict for claim in claims}


# ---- readers ---------------------------------------------------------------------------------------------------


def test_item_rows_keep_one_row_per_item_and_seed():
    table = _readers([[True] * 30, [False] * 30], [[True] * 30], [False] * 30)
    rows = item_rows(table)
    assert rows.height == 5 * 30
    assert rows.filter(pl.col("method") == "clustering_gt_only")["doc_id"].n_unique() == 30


def test_accuracy_interval_resamples_items_with_their_seeds_together():
    coin = [i % 2 == 0 for i in range(30)]
    table = _readers([coin, coin], [coin], coin)
    row = accuracy_intervals(table).filter(pl.col("method") == "clustering_gt_only").row(0, named=True)
    assert row["n"] == 30 and row["seeds"] == 2 and row["unit"] == "test item"  # items, not 60 item × seed rows
    half_width = 1.96 * math.sqrt(0.25 / 30)  # the normal approximation of a fair coin's mean over 30 items
    assert row["accuracy"] == pytest.approx(0.5)
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * half_width, rel=0.2)


def test_seeds_are_averaged_within_an_item_before_the_paired_difference():
    # clustering right on every item with seed 0 and on none with seed 1: 0.5 per item; in-context never right
    table = _readers([[True] * 30, [False] * 30], [[False] * 30, [False] * 30], [False] * 30)
    row = paper_comparisons(table).filter(pl.col("baseline") == "in_context").row(0, named=True)
    assert (row["difference"], row["ci_low"], row["ci_high"], row["n"]) == pytest.approx((0.5, 0.5, 0.5, 30))


def test_comparisons_use_each_readers_paper_input():
    # kNN prompting is right everywhere on the raw input and nowhere on the template (its paper's input)
    table = _readers([[True] * 30], [[True] * 30], [False] * 30)
    row = paper_comparisons(table).filter(pl.col("baseline") == "knn_prompting").row(0, named=True)
    assert row["baseline_input"] == "template" and row["difference"] == pytest.approx(1.0)


def test_clustering_claims_hold_fail_or_stay_inconclusive():
    ten = [i < 10 for i in range(30)]
    holds = reader_claims.clustering_claims(_readers([[True] * 30], [ten], [False] * 30), "t", "registers")
    assert _verdicts(holds) == {"t · gt only − in-context learning": "holds", "t · gt only − kNN prompting": "holds"}
    assert holds[0].estimate == pytest.approx(20 / 30) and holds[0].threshold == 0 and holds[0].holds_when == "above"
    fails = reader_claims.clustering_claims(_readers([[False] * 30], [[True] * 30], [True] * 30), "t", "registers")
    assert set(_verdicts(fails).values()) == {"fails"}
    even, odd = [i % 2 == 0 for i in range(30)], [i % 2 == 1 for i in range(30)]
    mixed = reader_claims.clustering_claims(_readers([even], [odd], odd), "t", "registers")
    assert set(_verdicts(mixed).values()) == {"inconclusive"}


def test_a_table_without_items_gives_inconclusive_claims_that_say_why():
    table = _readers([[True] * 30], [[False] * 30], [False] * 30).drop("doc_id", "correct")
    claims = reader_claims.clustering_claims(table, "t", "registers")
    assert [claim.verdict for claim in claims] == ["inconclusive", "inconclusive"]
    assert claims[0].estimate == pytest.approx(1.0) and "re-run compare_readers" in claims[0].note


def _evaluation(shuffled_gap: list[float], none_gap: list[float]) -> pl.DataFrame:
    own = [1.0 + 0.01 * i for i in range(len(shuffled_gap))]
    rows = []
    for condition, gaps in (("true", [0.0] * len(own)), ("shuffled", shuffled_gap), ("none", none_gap)):
        rows += [{"doc_id": f"p{i}", "condition": condition, "reconstruction_nll": own[i] + gap,
                  "register_nll": 2 * own[i] + gap, "register_correct": condition == "true"}
                 for i, gap in enumerate(gaps)]  # fmt: skip
    return pl.DataFrame(rows)


def test_elm_controls_are_paired_on_the_passage():
    # own losses vary by passage (1.00..1.19) but every shuffled loss is its passage's + 0.5: the paired
    # interval is the point 0.5, far narrower than an unpaired one
    controls = elm_controls(_evaluation([0.5] * 20, [0.5] * 20))
    row = controls.filter((pl.col("condition") == "shuffled") & (pl.col("measure") == "reconstruction_nll")).row(
        0, named=True
    )
    assert (row["difference"], row["ci_low"], row["ci_high"], row["n"]) == pytest.approx((0.5, 0.5, 0.5, 20))


def test_elm_claims_hold_fail_or_stay_inconclusive():
    alternating = [0.3 if i % 2 else -0.3 for i in range(20)]
    claims = reader_claims.elm_claims(_evaluation([0.5] * 20, alternating), "registers")
    verdicts = _verdicts(claims)
    assert verdicts["shuffled · reconstruction"] == "holds" and verdicts["none · reconstruction"] == "inconclusive"
    fails = reader_claims.elm_claims(_evaluation([-0.5] * 20, [-0.2] * 20), "registers")
    assert set(_verdicts(fails).values()) == {"fails"}


def test_reader_inputs_put_each_task_in_its_home_corpus_once():
    config = _config()
    registers = reader_claims.inputs(config, "m", "registers")
    # sentiment's corpus is not studied: its claims go with the first studied corpus
    assert set(registers) == {"clustering_registers", "clustering_sentiment", "elm"}
    assert set(reader_claims.inputs(config, "m", "debian")) == {"clustering_debian"}
    assert reader_claims.inputs(config, "other", "registers") == {}


# ---- the family ------------------------------------------------------------------------------------------------

MIXTURES = {"fam-a": {"a": 1.0}, "fam-b": {"b": 1.0}, "fam-uniform": {"a": 0.5, "b": 0.5}}


def _documents(bpb: dict[str, dict[str, list[float]]]) -> pl.DataFrame:
    """Per-document rows whose bits per byte are planted (bytes 100 + 10·i, so ratios of sums are weighted)."""
    rows = []
    for model, registers in bpb.items():
        for register, values in registers.items():
            for i, value in enumerate(values):
                size = 100 + 10 * i
                rows.append({"model": model, "doc_id": f"{register}{i}", "register": register, "bytes": size,
                             "nll": value * math.log(2) * size})  # fmt: skip
    return pl.DataFrame(rows)


def _family(own: list[float], uniform: list[float], other: list[float]) -> pl.DataFrame:
    """Register a: fam-a scores ``own``, fam-uniform ``uniform``, fam-b ``other``; register b: fam-b best."""
    b_scores = {"fam-a": [3.0] * len(own), "fam-b": [2.0] * len(own), "fam-uniform": [2.5] * len(own)}
    return _documents({"fam-a": {"a": own, "b": b_scores["fam-a"]}, "fam-b": {"a": other, "b": b_scores["fam-b"]},
                       "fam-uniform": {"a": uniform, "b": b_scores["fam-uniform"]}})  # fmt: skip


def test_specialisation_is_the_best_other_member_minus_the_own_member_as_a_ratio_of_sums():
    rng = np.random.default_rng(0)
    own = list(2.0 + 0.1 * rng.standard_normal(12))
    table = specialisation_intervals(_family(own, [v + 0.2 for v in own], [3.0] * 12), MIXTURES)
    row = table.filter(pl.col("register") == "a").row(0, named=True)
    assert row["own_member"] == "fam-a" and row["best_other_member"] == "fam-uniform"
    # every document is 0.2 bits per byte worse under the uniform member: the ratio of sums differs by 0.2 too
    assert (row["delta_bits_per_byte"], row["ci_low"], row["ci_high"]) == pytest.approx((0.2, 0.2, 0.2))
    assert row["n"] == 12 and row["unit"] == "document"
    assert table.filter(pl.col("register") == "b")["delta_bits_per_byte"][0] == pytest.approx(0.5)


def test_specialisation_claims_hold_fail_or_stay_inconclusive():
    config = _config()
    twelve = [2.0] * 12
    holds = training_claims.specialisation_claims(
        specialisation_intervals(_family(twelve, [2.2] * 12, [3.0] * 12), MIXTURES), config
    )
    assert _verdicts(holds) == {"a · fam-a": "holds", "b · fam-b": "holds"}
    fails = training_claims.specialisation_claims(
        specialisation_intervals(_family(twelve, [1.8] * 12, [3.0] * 12), MIXTURES), config
    )
    assert _verdicts(fails)["a · fam-a"] == "fails"
    swings = [2.0 + (0.5 if i % 2 else -0.5) for i in range(12)]  # the uniform member better on half the documents
    mixed = training_claims.specialisation_claims(
        specialisation_intervals(_family(twelve, swings, [3.0] * 12), MIXTURES), config
    )
    assert _verdicts(mixed)["a · fam-a"] == "inconclusive"


def _relations(rows: list[tuple[str, str, float, float, float, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "level": level,
                "model": "all",
                "processing": "none",
                "metric": metric,
                "band": "late",
                "measure": "bits_per_byte",
                "n": n,
                "n_models": 4,
                "spearman": rho,
                "pearson": rho,
                "ci_low": low,
                "ci_high": high,
                "unit": "model",
            }
            for level, metric, rho, low, high, n in rows
        ]
    )


def test_relation_claims_read_each_metric_on_its_hypothesised_side():
    table = _relations(
        [
            ("models", "mean_cosine", 0.8, 0.2, 0.95, 12),  # anisotropy up with bits per byte: the hypothesis
            ("models", "isoscore", 0.8, 0.2, 0.95, 12),  # isotropy up with bits per byte: against it
            ("models", "effective_rank_fraction", 0.1, -0.5, 0.6, 12),
            ("models", "twonn", -0.9, -1.0, -0.5, 12),  # no stated direction: no claim
            ("registers within m", "mean_cosine", 0.8, 0.2, 0.95, 3),  # not a claimed level
        ]
    )
    claims = training_claims.relation_claims(table, _config())
    assert _verdicts(claims) == {
        "mean_cosine · across models": "holds",
        "isoscore · across models": "fails",
        "effective_rank_fraction · across models": "inconclusive",
    }
    assert {claim.holds_when for claim in claims if claim.detail.startswith("isoscore")} == {"below"}


def test_relations_without_intervals_stay_inconclusive():
    table = _relations([("models", "mean_cosine", 1.0, 0.0, 0.0, 4)]).drop("ci_low", "ci_high", "unit")
    (claim,) = training_claims.relation_claims(table, _config())
    assert claim.verdict == "inconclusive" and claim.estimate == 1.0 and "few points" in claim.note


def test_family_inputs_only_on_its_corpus_for_studied_models():
    config = _config()
    assert set(training_claims.inputs(config, "m", "registers")) == {"specialisation", "relations"}
    assert training_claims.inputs(config, "m", "debian") == {}
    assert training_claims.inputs(config, "unstudied", "registers") == {}
    config["training"]["analysis"]["corpus"] = "debian"
    assert training_claims.inputs(config, "m", "debian")["relations"] == "results/training/fam/relations.parquet"
    assert training_claims.inputs({**config, "training": None}, "m", "debian") == {}
