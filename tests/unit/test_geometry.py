"""Geometry metrics: METHODS §10 checks 8-11 and 13 on synthetic data with known answers."""

import numpy as np
import pytest

from latent_atlas.geometry import (
    anisotropy,
    cluster_bootstrap,
    cosine_contributions,
    effective_rank,
    euclidean_contributions,
    fit_post_processing,
    intra_sentence_similarity,
    is_powered,
    isoscore,
    massive_rows,
    maximum_explainable_variance,
    mean_intra_sentence_similarity,
    random_pairs,
    self_similarity,
    twonn,
    weighted_pca_variances,
)

RNG = np.random.default_rng(0)


def test_cosine_contributions_sum_to_the_cosine():
    u, v = RNG.standard_normal((50, 16)), RNG.standard_normal((50, 16))
    cosine = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    np.testing.assert_allclose(cosine_contributions(u, v).sum(1), cosine, rtol=1e-12)
    np.testing.assert_allclose(euclidean_contributions(u, v).sum(1), 1.0, rtol=1e-12)


def test_a_rogue_dimension_carries_the_anisotropy_and_standardisation_removes_it():
    states = RNG.standard_normal((2000, 32))
    states[:, 5] += 20.0  # one dimension shared by every state: a rogue dimension
    groups = np.repeat(np.arange(200), 10)
    pairs = random_pairs(groups, 3000, seed=1)
    assert (groups[pairs[:, 0]] != groups[pairs[:, 1]]).all()
    raw = anisotropy(states, pairs)
    assert raw.mean_cosine > 0.8 and int(np.argmax(raw.cosine_share)) == 5 and raw.top_share(1) > 0.95
    assert raw.cosine_share.sum() == pytest.approx(raw.mean_cosine)
    standardised = fit_post_processing(states, "standardise")(states)
    assert abs(anisotropy(standardised, pairs).mean_cosine) < 0.02  # in-sample standardisation: ≈ 0
    permuted = anisotropy(states[:, RNG.permutation(32)], pairs)
    assert permuted.mean_cosine == pytest.approx(raw.mean_cosine)  # permuting dimensions changes nothing


def test_isoscore_reference_cases():
    assert isoscore(RNG.standard_normal((20000, 10))) > 0.95  # isotropic Gaussian
    line = np.outer(RNG.standard_normal(500), RNG.standard_normal(10))
    assert isoscore(line) == pytest.approx(0.0, abs=1e-9)
    n, k = 12, 4
    subspace = np.zeros((20000, n))
    subspace[:, :k] = RNG.standard_normal((20000, k))
    assert isoscore(subspace) == pytest.approx((k - 1) / (n - 1), abs=0.02)
    rotation, _ = np.linalg.qr(RNG.standard_normal((n, n)))
    moved = 3.0 * subspace @ rotation + 5.0  # rotation, scale and translation leave IsoScore unchanged
    assert isoscore(moved) == pytest.approx(isoscore(subspace), abs=1e-9)


def test_whitening_gives_identity_covariance_on_its_fitting_set():
    states = RNG.standard_normal((3000, 8)) @ RNG.standard_normal((8, 8)) + 4.0
    whitened = fit_post_processing(states, "whiten")(states)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(8), atol=1e-6)
    abtt = fit_post_processing(states, "all_but_the_top", top=2)(states)
    assert effective_rank(abtt) < effective_rank(states)
    with pytest.raises(ValueError, match="unknown post-processing"):
        fit_post_processing(states, "sharpen")


@pytest.mark.parametrize("k", [5, 10])
def test_twonn_recovers_the_dimension_of_a_linear_subspace(k):
    basis, _ = np.linalg.qr(RNG.standard_normal((64, k)))
    points = RNG.standard_normal((5000, k)) @ basis.T  # Gaussian: a uniform cube's faces bias TwoNN low (8.6 at k=10)
    assert twonn(points) == pytest.approx(k, rel=0.1)
    assert twonn(7.0 * points + 1.0) == pytest.approx(twonn(points), rel=1e-6)  # scale and translation


def test_ethayarajh_measures():
    occurrence = RNG.standard_normal(16)
    assert self_similarity(np.tile(occurrence, (5, 1))) == pytest.approx(1.0)  # identical contexts
    assert abs(self_similarity(RNG.standard_normal((400, 64)))) < 0.01  # isotropic: baseline ≈ 0
    assert 0 < maximum_explainable_variance(RNG.standard_normal((30, 16))) <= 1
    assert maximum_explainable_variance(np.tile(occurrence, (5, 1))) == pytest.approx(1.0)
    sentence = RNG.standard_normal((12, 16)) + 10.0
    assert intra_sentence_similarity(sentence) > 0.9


# ---- power, bootstrap, massive tokens, intra-sentence similarity (issue 17, items 5, 8 and 9) ----------------------


def _isoscore_by_hand(variances: np.ndarray) -> float:
    """Rudman et al.'s steps 3-6 written out on population variances (the truth a sample estimates)."""
    n = len(variances)
    normalised = np.sqrt(n) * variances / np.linalg.norm(variances)
    delta = np.linalg.norm(normalised - 1) / np.sqrt(2 * (n - np.sqrt(n)))
    k = (n - delta**2 * (n - np.sqrt(n))) ** 2 / n
    return (k - 1) / (n - 1)


def _effective_rank_by_hand(variances: np.ndarray) -> float:
    p = np.sqrt(variances) / np.sqrt(variances).sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_isotropic_isoscore_is_near_one_when_powered_and_biased_below_d():
    d = 16
    rng = np.random.default_rng(11)
    powered = rng.standard_normal((200 * d, d))
    assert is_powered(len(powered), d, 5.0) and isoscore(powered) > 0.98
    starved = rng.standard_normal((d // 2, d))  # n < d: at most n − 1 axes carry variance
    assert not is_powered(len(starved), d, 5.0)
    assert isoscore(starved) < (d // 2 - 1) / (d - 1) + 1e-9  # the subspace bound, far below the truth (1)
    assert effective_rank(starved) < d // 2


def test_the_document_bootstrap_interval_covers_the_true_value_of_a_powered_sample():
    d, n = 16, 2000
    scales = np.geomspace(1, 4, d)  # population variances scales²: IsoScore and effective rank known exactly
    rng = np.random.default_rng(5)
    states = rng.standard_normal((n, d)) * scales @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    documents = np.arange(n) // 10
    intervals = cluster_bootstrap(states, documents, replicates=200, confidence=0.95, seed=0)
    low, high = intervals["isoscore"]
    assert low <= _isoscore_by_hand(scales**2) <= high and high - low < 0.06
    low, high = intervals["effective_rank"]
    assert low <= _effective_rank_by_hand(scales**2) <= high
    assert is_powered(n, d, 5.0)
    isotropic = cluster_bootstrap(rng.standard_normal((n, d)), documents, replicates=200, seed=1)
    assert isotropic["isoscore"][0] <= 1.0 <= isotropic["isoscore"][1]  # the plug-in itself is ≈ 1 − d/n


@pytest.mark.parametrize(("rows", "d"), [(120, 6), (12, 20), (60, 5)])  # moments, Gram, weighted-rows routes
def test_the_bootstrap_resamples_whole_documents_with_a_basic_interval(rows, d, monkeypatch):
    """Recompute the interval by hand: the same seeded document draws, rows repeated, numpy's covariance."""
    if rows == 60:
        monkeypatch.setattr("latent_atlas.geometry.metrics._GROUP_MOMENTS_BYTES", 0)
    rng = np.random.default_rng(2)
    states = rng.standard_normal((rows, d)) * np.arange(1, d + 1) + 3.0
    documents = np.repeat(np.array([4, 9, 1, 7, 3, 8]), rows // 6)
    names, inverse = np.unique(documents, return_inverse=True)

    def by_hand(sample: np.ndarray) -> tuple[float, float]:
        variances = np.linalg.eigvalsh(np.cov(sample, rowvar=False))[::-1]
        variances = np.where(variances > 1e-9 * variances[0], variances, 0.0)
        return _isoscore_by_hand(variances), _effective_rank_by_hand(variances[variances > 0])

    draws = np.random.default_rng(7)
    replicates = []
    for _ in range(30):
        counts = np.bincount(draws.integers(0, len(names), len(names)), minlength=len(names))
        replicates.append(by_hand(np.repeat(states, counts[inverse], axis=0)))
    estimate = by_hand(states)
    intervals = cluster_bootstrap(states, documents, replicates=30, confidence=0.9, seed=7)
    for column, metric in enumerate(("isoscore", "effective_rank")):
        q_low, q_high = np.quantile([r[column] for r in replicates], [0.05, 0.95])
        expected = np.clip([2 * estimate[column] - q_high, 2 * estimate[column] - q_low], 0 if column == 0 else 1, None)
        assert intervals[metric] == pytest.approx(tuple(np.minimum(expected, 1 if column == 0 else d)), rel=1e-6)
    few = documents % 4  # three documents: too few to resample
    assert all(np.isnan(cluster_bootstrap(states, few, 30)["isoscore"]))


@pytest.mark.parametrize("rows", [4, 40])  # fewer rows than dimensions (the Gram route) and more
def test_weighted_variances_equal_those_of_the_repeated_rows(rows):
    states = RNG.standard_normal((rows, 10)) @ RNG.standard_normal((10, 10))
    weights = RNG.integers(0, 4, rows)
    weights[:2] = 1
    expected = np.clip(np.linalg.eigvalsh(np.cov(np.repeat(states, weights, axis=0), rowvar=False))[::-1], 0, None)
    np.testing.assert_allclose(weighted_pca_variances(states, weights), expected, atol=1e-10)


def test_massive_rows_exceed_a_multiple_of_the_median_norm_of_eligible_rows():
    norms = np.array([1.0, 1.1, 0.9, 50.0, 1.0, 9.0, 1.2, 300.0])
    eligible = np.array([True, True, True, True, True, True, True, False])  # the last: position 0
    np.testing.assert_array_equal(massive_rows(norms, eligible, 8.0), [0, 0, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(massive_rows(norms, eligible, 10.0), [0, 0, 0, 1, 0, 0, 0, 0])


def test_intra_sentence_similarity_is_averaged_per_sentence():
    states = RNG.standard_normal((9, 5))
    sentences = np.array([0, 0, 0, 3, 3, 7, 9, 9, 9])  # sentence 7 has one token: left out
    expected = []
    for members in ([0, 1, 2], [3, 4], [6, 7, 8]):
        block = states[members]
        mean = block.mean(0)
        expected.append(np.mean(block @ mean / (np.linalg.norm(block, axis=1) * np.linalg.norm(mean))))
    assert mean_intra_sentence_similarity(states, sentences) == (pytest.approx(np.mean(expected)), 3)
