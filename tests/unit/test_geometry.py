"""Geometry metrics: METHODS §10 checks 8-11 and 13 on synthetic data with known answers."""

import numpy as np
import pytest

from latent_atlas.geometry import (
    anisotropy,
    cosine_contributions,
    effective_rank,
    euclidean_contributions,
    fit_post_processing,
    intra_sentence_similarity,
    isoscore,
    maximum_explainable_variance,
    random_pairs,
    self_similarity,
    twonn,
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
