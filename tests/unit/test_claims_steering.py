"""Steering claims decided on planted tables: a planted effect holds, its opposite fails, noise or too few units
stay inconclusive; strengths are chosen below collapse / within the KL bound; pairs stay within one prompt."""

import math

import numpy as np
import polars as pl
import pytest

from latent_atlas.claims import Claim
from latent_atlas.claims import steering as area


def _sweep(
    effects: dict[float, tuple[float, float]],
    prompts: int = 30,
    noise: float = 0.05,
    layer: int = 6,
    decodings: tuple[str, ...] = ("greedy",),
    samples: int = 1,
    seed: int = 0,
) -> pl.DataFrame:
    """A generation table: per strength c, (Δ sentiment, Δ log-perplexity) planted on every continuation.

    Each (prompt, sample, decoding) has its own unsteered sentiment and perplexity (spread widely, so unpaired
    comparisons would be noisy); steered rows add the planted change plus small independent noise.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in range(prompts):
        for decoding in decodings:
            for sample in range(samples if decoding == "sampled" else 1):
                base_sentiment, base_log_ppl = rng.uniform(-0.8, 0.8), rng.uniform(1.0, 3.0)
                for coefficient, (sentiment, log_ratio) in {0.0: (0.0, 0.0), **effects}.items():
                    jitter = rng.normal(0, noise, 2) if coefficient else (0.0, 0.0)
                    rows.append({
                        "coefficient": coefficient, "decoding": decoding, "prompt_id": prompt, "sample": sample,
                        "sentiment": base_sentiment + sentiment + jitter[0],
                        "perplexity": math.exp(base_log_ppl + log_ratio + jitter[1]),
                        "off_target_kl": coefficient / 10, "layer": layer,
                    })  # fmt: skip
    return pl.DataFrame(rows)


def _paired_mean(table: pl.DataFrame, value: str, coefficient: float) -> float:
    """The mean within-pair difference, computed with numpy over an explicit dictionary of pairs."""
    keys = ("prompt_id", "sample", "decoding")
    base = {tuple(r[k] for k in keys): r[value] for r in table.filter(pl.col("coefficient") == 0).iter_rows(named=True)}
    steered = table.filter(pl.col("coefficient") == coefficient).iter_rows(named=True)
    return float(np.mean([r[value] - base[tuple(r[k] for k in keys)] for r in steered]))


# ActAdd and mean difference: sentiment rises below collapse, fluency collapses beyond


def test_the_best_strength_below_collapse_is_chosen_and_a_planted_rise_holds():
    table = _sweep({2.0: (0.2, 0.1), 4.0: (0.4, 0.2), 8.0: (0.7, 2.0)})  # 8 is collapsed: ratio e² ≈ 7.4
    claim = area.raises_sentiment(table, "actadd", seed=0)
    assert claim.verdict == "holds" and claim.detail == "actadd · resid.06 · strength 4"
    assert claim.estimate == pytest.approx(_paired_mean(table, "sentiment", 4.0), abs=1e-12)
    assert claim.n == 30 and claim.unit == "prompt" and claim.threshold == 0 and claim.holds_when == "above"
    assert "k = 2" in claim.statistic and "97.5%" in claim.statistic  # Bonferroni over the two fluent strengths
    assert "monotone up to 4" in claim.note and "not monotone" not in claim.note


def test_a_planted_fall_fails():
    table = _sweep({2.0: (-0.3, 0.1), 4.0: (-0.4, 0.2)})
    claim = area.raises_sentiment(table, "mean_difference", seed=0)
    assert claim.verdict == "fails" and claim.detail.endswith("strength 2")  # the largest Δ is still negative
    assert claim.ci_high < 0


def test_noise_around_zero_and_too_few_prompts_are_inconclusive():
    noisy = _sweep({2.0: (0.0, 0.0), 4.0: (0.0, 0.1)}, prompts=30, noise=0.5)
    assert area.raises_sentiment(noisy, "actadd").verdict == "inconclusive"
    tiny = _sweep({2.0: (0.5, 0.0)}, prompts=2)
    claim = area.raises_sentiment(tiny, "actadd")
    assert claim.verdict == "inconclusive" and claim.n == 2 and math.isnan(claim.ci_low)


def test_no_strength_below_collapse_is_inconclusive_and_says_so():
    claim = area.raises_sentiment(_sweep({2.0: (0.5, 1.0), 4.0: (0.6, 3.0)}), "actadd")
    assert claim.verdict == "inconclusive" and "no strength below collapse" in claim.note


def test_pairs_stay_within_prompt_sample_and_decoding_and_prompts_are_the_unit():
    table = _sweep({4.0: (0.3, 0.0)}, prompts=12, decodings=("greedy", "sampled"), samples=3)
    claim = area.raises_sentiment(table, "actadd")
    assert claim.estimate == pytest.approx(_paired_mean(table, "sentiment", 4.0), abs=1e-12)
    assert claim.n == 12 and claim.verdict == "holds" and "greedy, sampled" in claim.note


def test_fluency_collapse_holds_on_a_planted_ratio_and_fails_without_one():
    collapsed = _sweep({4.0: (0.3, 0.1), 16.0: (0.0, math.log(6.0))})
    claim = area.collapses_fluency(collapsed, "actadd")
    geometric = math.exp(_paired_mean(collapsed.with_columns(pl.col("perplexity").log()), "perplexity", 16.0))
    assert claim.verdict == "holds" and claim.estimate == pytest.approx(geometric, rel=1e-12)
    assert claim.ci_low <= claim.estimate <= claim.ci_high and claim.threshold == 2.0
    assert claim.detail.endswith("strength 16") and "first exceeds 2 at strength 16" in claim.note
    fluent = area.collapses_fluency(_sweep({4.0: (0.3, 0.0), 16.0: (0.3, 0.1)}), "actadd")
    assert fluent.verdict == "fails" and fluent.ci_high < 2


# ICV


@pytest.mark.parametrize(("change", "verdict"), [(0.3, "holds"), (-0.3, "fails"), (0.0, "inconclusive")])
def test_icv_moves_sentiment_at_its_largest_coefficient(change, verdict):
    noise = 0.5 if verdict == "inconclusive" else 0.05
    table = _sweep({0.05: (-1.0, 0.0), 0.1: (change, 0.5)}, noise=noise, layer=0)  # the largest λ decides
    claim = area.icv_moves_sentiment(table)
    assert claim.verdict == verdict and claim.detail == "icv · all blocks (MLP outputs) · λ 0.1"
    ratio = math.exp(_paired_mean(table.with_columns(pl.col("perplexity").log()), "perplexity", 0.1))
    assert f"{ratio:.2f}" in claim.note


# ITI


def _iti(base: np.ndarray, flipped: dict[float, tuple[np.ndarray, float]]) -> pl.DataFrame:
    """A per-strength ITI table whose items' margins are ``base`` at α = 0 and planted per α (with its KL)."""
    rows = [{"coefficient": 0.0, "off_target_kl": 0.0, "margins": base}]
    rows += [{"coefficient": a, "off_target_kl": kl, "margins": m} for a, (m, kl) in flipped.items()]
    return pl.DataFrame({
        "coefficient": [r["coefficient"] for r in rows], "off_target_kl": [r["off_target_kl"] for r in rows],
        "relative_norm": [0.0] * len(rows), "test_truth_accuracy": [float((r["margins"] > 0).mean()) for r in rows],
        "test_items": [len(base)] * len(rows), "heads": [12] * len(rows),
        "test_item_margins": [r["margins"].tolist() for r in rows],
    })  # fmt: skip


def test_iti_picks_the_best_alpha_within_the_kl_bound_and_a_planted_gain_holds():
    base = np.array([1.0] * 36 + [-1.0] * 24)  # 60 items, accuracy 0.6
    fixed = base.copy()
    fixed[36:48] = 0.5  # α = 5 makes 12 wrong items right: +0.2
    every = np.ones(60)  # α = 10 makes all right (+0.4) but its KL is beyond the bound
    claim = area.iti_raises_truth(_iti(base, {5.0: (fixed, 0.2), 10.0: (every, 0.9)}))
    assert claim.verdict == "holds" and claim.detail == "iti · α 5"
    assert claim.estimate == pytest.approx(12 / 60) and claim.n == 60 and claim.unit == "statement item"
    assert "base accuracy (α = 0) 0.600" in claim.note and "not at ceiling" in claim.note and "k = 1" in claim.statistic


def test_iti_a_planted_loss_fails_and_unbounded_or_tiny_is_inconclusive():
    base = np.array([1.0] * 36 + [-1.0] * 24)
    worse = base.copy()
    worse[:12] = -0.5
    assert area.iti_raises_truth(_iti(base, {5.0: (worse, 0.2)})).verdict == "fails"
    unbounded = area.iti_raises_truth(_iti(base, {5.0: (np.ones(60), 0.9)}))
    assert unbounded.verdict == "inconclusive" and "within the KL bound" in unbounded.note
    tiny = area.iti_raises_truth(_iti(np.array([-1.0, -1.0]), {5.0: (np.array([1.0, 1.0]), 0.1)}))
    assert tiny.verdict == "inconclusive" and tiny.n == 2


def test_an_iti_table_without_item_margins_is_inconclusive_not_an_error():
    table = _iti(np.array([1.0, -1.0, 1.0]), {5.0: (np.ones(3), 0.1)}).drop("test_item_margins")
    claim = area.iti_raises_truth(table)
    assert claim.verdict == "inconclusive" and "rerun steer_heads" in claim.note


# optimised vectors


@pytest.mark.parametrize(("exact", "verdict"), [([True] * 40, "holds"), ([True, False] * 20, "fails"),
                                                ([True, True], "inconclusive")])  # fmt: skip
def test_optimised_recovery_rate(exact, verdict):
    table = pl.DataFrame({"target_id": range(len(exact)), "layer": 10, "exact_match": exact,
                          "bleu": [100.0 if e else 40.0 for e in exact]})  # fmt: skip
    claim = area.optimised_recovers(table)
    assert claim.verdict == verdict and claim.estimate == pytest.approx(np.mean(exact))
    assert claim.threshold == 0.9 and claim.unit == "target sentence" and claim.detail == "optimised · resid.10"
    if all(exact):
        assert f"lower bound {0.025 ** (1 / len(exact)):.3f}" in claim.note  # Clopper–Pearson, all recovered


# the area contract


def _config(models: list[str] | None) -> dict:
    return {"run": {"models": ["m", "other"]}, "steering": {"models": models, "seed": 0,
            "methods": ["actadd", "iti", "optimised"]}}  # fmt: skip


def test_inputs_are_the_configured_methods_for_steered_models_in_every_corpus():
    expected = {m: f"results/steering/m/{m}.parquet" for m in ("actadd", "iti", "optimised")}
    assert area.inputs(_config(["m"]), "m", "registers") == expected == area.inputs(_config(["m"]), "m", "debian")
    assert area.inputs(_config(["m"]), "other", "registers") == {}
    assert area.inputs(_config(None), "other", "registers") == {m: p.replace("/m/", "/other/") for m, p in
                                                                 expected.items()}  # fmt: skip


def test_claims_gives_one_pair_of_rows_per_generation_layer_and_one_per_other_method():
    generation = pl.concat([_sweep({2.0: (0.3, 0.1), 8.0: (0.0, 2.0)}, layer=layer) for layer in (4, 6)])
    optimised = pl.DataFrame({"target_id": [0, 1, 2], "layer": 10, "exact_match": True, "bleu": 100.0})
    base = np.array([1.0, -1.0] * 10)
    tables = {"actadd": generation, "iti": _iti(base, {5.0: (np.ones(20), 0.1)}), "optimised": optimised}
    rows = area.claims(tables, _config(["m"]), "m", "registers")
    assert all(isinstance(row, Claim) for row in rows)
    assert [(r.claim, r.detail) for r in rows] == [
        ("steering_raises_sentiment", "actadd · resid.04 · strength 2"),
        ("steering_collapses_fluency", "actadd · resid.04 · strength 8"),
        ("steering_raises_sentiment", "actadd · resid.06 · strength 2"),
        ("steering_collapses_fluency", "actadd · resid.06 · strength 8"),
        ("iti_raises_truth", "iti · α 5"),
        ("optimised_vectors_recover", "optimised · resid.10"),
    ]
    assert [r.verdict for r in rows[:4]] == ["holds"] * 4
