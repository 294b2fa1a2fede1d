"""The bootstrap helper against closed forms, and its resampling unit."""

import numpy as np
import polars as pl
import pytest

from latent_atlas.stats import (
    bootstrap_mean,
    bootstrap_statistic,
    paired_differences,
    percentile_interval,
    summarise,
    summarise_paired,
)


def test_interval_of_a_normal_mean_matches_the_closed_form() -> None:
    sample = np.random.default_rng(3).normal(5.0, 2.0, size=400)
    interval = bootstrap_mean(sample, unit="draw", replicates=4000, seed=1)
    half = 1.96 * sample.std(ddof=1) / np.sqrt(len(sample))
    assert interval.estimate == pytest.approx(sample.mean())
    assert interval.low == pytest.approx(sample.mean() - half, abs=0.08 * half)
    assert interval.high == pytest.approx(sample.mean() + half, abs=0.08 * half)
    assert (interval.n, interval.unit) == (400, "draw")


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    trials = 600  # the percentile interval's coverage at n = 100 is about 0.94; binomial sd over 600 trials ~0.01
    hits = sum(not bootstrap_mean(rng.normal(0.0, 1.0, 100), unit="draw", replicates=500, seed=k).excludes(0.0)
               for k in range(trials))  # fmt: skip
    assert 0.91 <= hits / trials <= 0.975


def test_same_seed_same_interval_and_other_seed_other_interval() -> None:
    sample = np.random.default_rng(1).normal(size=50)
    first, again = bootstrap_mean(sample, unit="u", seed=7), bootstrap_mean(sample, unit="u", seed=7)
    assert (first.low, first.high) == (again.low, again.high)
    assert (first.low, first.high) != (bootstrap_mean(sample, unit="u", seed=8).low, first.high)


def test_cluster_resampling_counts_units_not_rows_and_widens_for_correlated_rows() -> None:
    rng = np.random.default_rng(2)
    prompt_effect = rng.normal(0.0, 1.0, 20)
    values = np.repeat(prompt_effect, 10) + rng.normal(0.0, 0.05, 200)  # ten near-copies of each prompt
    units = np.repeat(np.arange(20), 10)
    clustered = bootstrap_mean(values, units, unit="prompt", seed=0)
    naive = bootstrap_mean(values, unit="row", seed=0)
    assert clustered.n == 20 and naive.n == 200
    # the clustered half-width is the one of 20 independent values: 1.96 * sd(prompt means) / sqrt(20)
    expected = 1.96 * prompt_effect.std(ddof=1) / np.sqrt(20)
    assert (clustered.high - clustered.low) / 2 == pytest.approx(expected, rel=0.2)
    assert (clustered.high - clustered.low) > 2.5 * (naive.high - naive.low)


def test_too_few_units_give_no_interval() -> None:
    interval = bootstrap_mean([1.0, 2.0], unit="seed")
    assert np.isnan(interval.low) and np.isnan(interval.high) and interval.n == 2
    assert not interval.excludes(100.0)


def test_percentile_interval_reads_the_quantiles_of_the_finite_draws() -> None:
    # 1001 planted draws 0, 0.001, ..., 1 (shuffled): numpy's linear quantile q of them is exactly q
    draws = np.random.default_rng(4).permutation(np.arange(1001) / 1000)
    interval = percentile_interval(0.5, draws, n=40, unit="document")
    assert (interval.estimate, interval.n, interval.unit) == (0.5, 40, "document")
    assert interval.low == pytest.approx(0.025) and interval.high == pytest.approx(0.975)
    narrower = percentile_interval(0.5, draws, n=40, unit="document", confidence=0.9)
    assert (narrower.low, narrower.high) == (pytest.approx(0.05), pytest.approx(0.95))
    # undefined replicates (NaN, ±inf) are dropped, not ranked: the same interval as without them
    polluted = np.concatenate([draws, [np.nan, np.inf, -np.inf, np.nan]])
    assert percentile_interval(0.5, polluted, n=40, unit="document") == interval


def test_percentile_interval_is_nan_with_too_few_units_or_finite_draws() -> None:
    draws = np.linspace(0.0, 1.0, 101)
    few_units = percentile_interval(0.5, draws, n=2, unit="seed")
    assert np.isnan(few_units.low) and np.isnan(few_units.high) and few_units.n == 2 and few_units.estimate == 0.5
    few_draws = percentile_interval(0.5, [0.1, np.nan, 0.9, np.inf], n=50, unit="seed")
    assert np.isnan(few_draws.low) and np.isnan(few_draws.high)
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(0.5, draws, n=50, unit="seed", confidence=95)


def test_paired_resampling_keeps_pairs() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(0.0, 5.0, 30)  # large between-prompt spread, small constant effect
    rows = pl.DataFrame({
        "prompt": np.tile(np.arange(30), 2),
        "strength": np.repeat([0, 4], 30),
        "score": np.concatenate([base, base + 0.5 + rng.normal(0, 0.01, 30)]),
    })  # fmt: skip
    differences = paired_differences(rows, "score", "strength", 4, 0, ["prompt"])
    np.testing.assert_allclose(differences.sort("prompt")["score"].to_numpy(), 0.5, atol=0.05)
    paired = summarise_paired(rows, "score", "strength", 0, [], "prompt", ["prompt"], unit="prompt")
    assert paired["ci_low"][0] > 0.45 and paired["ci_high"][0] < 0.55  # pairs resampled together: tight
    unpaired = summarise(rows, "score", ["strength"], "prompt", unit="prompt")
    assert (unpaired["ci_high"] - unpaired["ci_low"]).min() > 2.0  # each arm alone carries the prompt spread


def test_paired_differences_refuse_a_missing_partner() -> None:
    rows = pl.DataFrame({"prompt": [0, 1, 0], "strength": [0, 0, 4], "score": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="without a 0 partner"):
        paired_differences(rows.filter(pl.col("prompt") != 0).vstack(rows.filter(pl.col("strength") == 4)),
                           "score", "strength", 4, 0, ["prompt"])  # fmt: skip


def test_statistic_bootstrap_of_a_correlation_resamples_units() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=200)
    rows = pl.DataFrame({"item": np.arange(200), "x": x, "y": x + rng.normal(size=200)})
    interval = bootstrap_statistic(rows, lambda t: float(np.corrcoef(t["x"], t["y"])[0, 1]), "item",
                                   unit="item", replicates=500)  # fmt: skip
    # Fisher's z interval of r with n = 200
    r = interval.estimate
    z, se = np.arctanh(r), 1 / np.sqrt(197)
    assert interval.low == pytest.approx(np.tanh(z - 1.96 * se), abs=0.03)
    assert interval.high == pytest.approx(np.tanh(z + 1.96 * se), abs=0.03)
