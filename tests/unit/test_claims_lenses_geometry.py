"""Verdicts of the lens and geometry claims on planted tables, and the intervals they rest on."""

import numpy as np
import polars as pl
import pytest

from latent_atlas.claims import geometry as geometry_claims
from latent_atlas.claims import lenses as lens_claims
from latent_atlas.geometry.metrics import document_draws, pair_means, pair_weights, top_shares, weighted_auc
from latent_atlas.geometry.relations import spearman_interval
from latent_atlas.lenses.evaluate import curves_from_documents, paired_lens_difference

LAYERS = (0, 5, 10)


def _documents(deltas: dict[int, float], n_docs: int = 30, noise: float = 0.05, seed: int = 0) -> pl.DataFrame:
    """Per-document KL sums of the logit and tuned lenses: tuned = logit + deltas[layer] (+ noise) per token."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in LAYERS:
        for doc in range(n_docs):
            count = int(rng.integers(2, 8))
            logit = 5.0 + rng.normal(0, 1, count)
            tuned = logit + deltas.get(layer, 0.0) + rng.normal(0, noise, count)
            if layer == LAYERS[-1]:  # the last layer: both are the model's head
                logit = tuned = np.full(count, 1e-9)
            for lens, values in (("logit", logit), ("tuned", tuned)):
                rows.append({"lens": lens, "layer": layer, "metric": "kl_to_final", "doc": doc,
                             "sum": float(values.sum()), "count": count})  # fmt: skip
    return pl.DataFrame(rows)


def _verdicts(claims: list, name: str) -> dict[str, str]:
    return {claim.detail: claim.verdict for claim in claims if claim.claim == name}


def test_tuned_below_logit_holds_fails_and_is_inconclusive_per_layer_and_over_every_layer():
    holds = _verdicts(lens_claims.tuned_below_logit(_documents({0: -2.0, 5: -1.0})), "tuned_below_logit")
    assert holds == {"layer 0": "holds", "layer 5": "holds", "every layer": "holds"}
    mixed = _verdicts(lens_claims.tuned_below_logit(_documents({0: -2.0, 5: 1.0})), "tuned_below_logit")
    assert mixed == {"layer 0": "holds", "layer 5": "fails", "every layer": "fails"}
    close = _verdicts(lens_claims.tuned_below_logit(_documents({0: -2.0, 5: 0.0}, noise=1.0)), "tuned_below_logit")
    assert close == {"layer 0": "holds", "layer 5": "inconclusive", "every layer": "inconclusive"}


def test_paired_difference_is_the_token_mean_of_the_differences_and_pairs_documents():
    documents = _documents({0: -1.5, 5: 0.3}, noise=0.0)
    table = paired_lens_difference(documents, "kl_to_final", "tuned", "logit")
    by_layer = dict(zip(table["layer"], table["value"], strict=True))
    assert by_layer[0] == pytest.approx(-1.5) and by_layer[5] == pytest.approx(0.3)
    assert by_layer[-1] == pytest.approx(0.3)  # the max over layers (the last layer's 0 is included here)
    # a constant per-token difference has no spread over documents: the paired interval collapses on it
    row = table.filter(pl.col("layer") == 0).row(0, named=True)
    assert row["ci_low"] == pytest.approx(-1.5) and row["ci_high"] == pytest.approx(-1.5)
    assert row["n"] == 30 and row["unit"] == "document"


def test_curve_interval_matches_the_normal_closed_form_over_documents():
    """One token per document, values ~ N(2, 1): the interval is about mean ± 1.96/√n."""
    rng = np.random.default_rng(3)
    n = 400
    values = rng.normal(2.0, 1.0, n)
    documents = pl.DataFrame({"lens": "logit", "layer": 0, "metric": "entropy", "doc": np.arange(n),
                              "sum": values, "count": 1})  # fmt: skip
    row = curves_from_documents(documents).row(0, named=True)
    half = 1.96 * values.std(ddof=1) / np.sqrt(n)
    assert row["value"] == pytest.approx(values.mean())
    assert row["ci_low"] == pytest.approx(values.mean() - half, abs=0.2 * half)
    assert row["ci_high"] == pytest.approx(values.mean() + half, abs=0.2 * half)


def _curves(value: float, low: float, high: float) -> pl.DataFrame:
    return pl.DataFrame({"lens": ["logit", "logit"], "layer": [0, 30], "metric": "kl_to_final",
                         "value": [9.0, value], "ci_low": [8.0, low], "ci_high": [10.0, high], "n": 60,
                         "unit": "document"})  # fmt: skip


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(1e-8, 5e-7, "holds"), (2e-6, 4e-6, "fails"), (5e-7, 2e-6, "inconclusive"), (np.nan, np.nan, "inconclusive")],
)
def test_last_layer_claim_reads_the_last_layer_interval(low, high, expected):
    (claim,) = lens_claims.last_layer_claim(_curves((low + high) / 2, low, high))
    assert claim.verdict == expected and claim.detail == "layer 30" and claim.threshold == 1e-6


def test_lens_inputs_are_empty_for_a_model_outside_the_lens_section():
    config = {"lenses": {"models": ["a"]}, "run": {"models": ["a", "b"]}}
    assert lens_claims.inputs(config, "b", "c") == {}
    assert set(lens_claims.inputs(config, "a", "c")) == {"curves", "documents"}
    assert geometry_claims.inputs(config, "z", "c") == {}


# -------------------------------------------------------------------------------------------------- geometry


def _metric(layer: int, processing: str, metric: str, value: float, low: float, high: float) -> dict:
    return {"layer": layer, "register": "all", "processing": processing, "metric": metric, "value": value,
            "n": 4000, "documents": 60, "ci_low": low, "ci_high": high, "unit": "document",
            "relative_depth": layer / 30}  # fmt: skip


def _geometry(change: tuple, raw_share: tuple, standard_share: tuple, auc_change: tuple) -> pl.DataFrame:
    rows = [_metric(layer, "none", "mean_cosine", 0.1, 0.05, 0.15) for layer in (0, 12, 18, 30)]
    rows += [
        _metric(12, "none", "mean_cosine_change", *change),  # 12 and 18 are equally deep: the shallower
        _metric(18, "none", "mean_cosine_change", -1.0, -1.1, -0.9),  # not the middle layer: ignored
        _metric(12, "none", "cosine_top3_share", *raw_share),
        _metric(12, "standardise", "cosine_top3_share", *standard_share),
        _metric(12, "standardise", "passage_register_auc_change", *auc_change),
    ]
    return pl.DataFrame(rows)


def test_geometry_claims_read_the_middle_layer_and_decide_each_side():
    holds = geometry_claims.space_claims(
        _geometry((0.3, 0.2, 0.4), (0.8, 0.7, 0.9), (0.1, 0.05, 0.2), (0.05, 0.01, 0.09))
    )
    verdicts = {claim.claim: claim.verdict for claim in holds}
    assert verdicts == dict.fromkeys(
        ["anisotropy_rises", "rogue_dimensions_dominate", "standardisation_removes_dominance",
         "separability_after_processing"], "holds",
    )  # fmt: skip
    assert {claim.detail for claim in holds} >= {"layer 12", "layer 12, standardise"}
    fails = geometry_claims.space_claims(
        _geometry((-0.3, -0.4, -0.2), (0.3, 0.2, 0.4), (0.7, 0.6, 0.8), (-0.05, -0.09, -0.01))
    )
    assert {claim.verdict for claim in fails} == {"fails"}
    unsure = geometry_claims.space_claims(
        _geometry((0.1, -0.1, 0.3), (0.5, 0.4, 0.6), (0.45, None, None), (0.0, -0.02, 0.02))
    )
    assert {claim.verdict for claim in unsure} == {"inconclusive"}


def _relations(rho: float, low: float, high: float, n: int) -> pl.DataFrame:
    return pl.DataFrame([{"level": "registers within m", "model": "m", "processing": "none", "metric": "twonn",
                          "band": "middle", "measure": "bits_per_byte", "n": n, "n_models": 1, "spearman": rho,
                          "pearson": rho, "ci_low": low, "ci_high": high, "unit": "register"}])  # fmt: skip


@pytest.mark.parametrize(
    ("rho", "low", "high", "expected"),
    [(0.9, 0.6, 1.0, "holds"), (-0.8, -1.0, -0.3, "fails"), (0.4, -0.4, 0.9, "inconclusive"),
     (1.0, np.nan, np.nan, "inconclusive")],
)  # fmt: skip
def test_geometry_performance_claim_carries_n(rho, low, high, expected):
    (claim,) = geometry_claims.relation_claims(_relations(rho, low, high, 8), "m")
    assert claim.verdict == expected and claim.n == 8


# -------------------------------------------------------------------------------------------------- intervals


def test_pair_weights_draw_documents_not_pairs():
    draws = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    weights = pair_weights(draws, np.array([0, 0, 1]), np.array([1, 2, 2]))
    assert weights.tolist() == [[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
    values = np.array([1.0, 3.0, 5.0])
    assert pair_means(values, weights).tolist() == pytest.approx([3.0, 3.0])
    counts = document_draws(7, 50, seed=1)
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()


def test_top_shares_and_weighted_auc_against_hand_computed_values():
    assert top_shares(np.array([[0.5, -0.3, 0.1, 0.1]]), 1) == pytest.approx([0.5])
    scores = np.array([0.9, 0.8, 0.3, 0.2])
    positive = np.array([True, False, True, False])
    # pos 0.9 beats both negatives, pos 0.3 beats one of two: AUC = 3/4
    assert weighted_auc(scores, positive, np.ones((1, 4))) == pytest.approx([0.75])
    # weighting the low positive twice: (1·(1+1) + 2·(1)) / (3 · 2) = 4/6
    assert weighted_auc(scores, positive, np.array([[1.0, 1.0, 2.0, 1.0]])) == pytest.approx([4 / 6])
    tied = weighted_auc(np.array([0.5, 0.5]), np.array([True, False]), np.ones((1, 2)))
    assert tied == pytest.approx([0.5])


def test_spearman_interval_is_nan_below_three_points_and_narrow_for_a_monotone_relation():
    assert all(np.isnan(spearman_interval(np.array([1.0, 2.0]), np.array([2.0, 1.0]))))
    x = np.arange(40.0)
    low, high = spearman_interval(x, x**3)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    low, high = spearman_interval(rng.normal(size=200), rng.normal(size=200))
    assert low < 0 < high and high - low < 0.4  # ≈ ±1.96/√200 = ±0.14 around 0
