"""Qualities of a latent space (METHODS §8): anisotropy, rogue dimensions, isotropy, rank, intrinsic dimension.

Pure functions on arrays of states ``X`` (``(n, d)``, one row per token or passage), computed in float64.
Post-processings (centring, standardisation, whitening, all-but-the-top) are fitted on one set and applied
to any other, so that fitting and evaluating on different corpora is a deliberate choice.
"""

from dataclasses import dataclass

import numpy as np

_EPS = 1e-12


def _float64(states: np.ndarray) -> np.ndarray:
    return np.asarray(states, dtype=np.float64)


def _unit(states: np.ndarray) -> np.ndarray:
    states = _float64(states)
    return states / np.maximum(np.linalg.norm(states, axis=-1, keepdims=True), _EPS)


def cosine_contributions(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """CC_i(u, v) = u_i v_i / (‖u‖ ‖v‖) per dimension (Timkey & van Schijndel); they sum to cos(u, v).

    ``u`` and ``v`` are ``(..., d)``; the result has their broadcast shape.
    """
    return _unit(u) * _unit(v)


def euclidean_contributions(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(u_i − v_i)² / ‖u − v‖² per dimension; they sum to 1 (0 where u = v)."""
    squared = (_float64(u) - _float64(v)) ** 2
    return squared / np.maximum(squared.sum(-1, keepdims=True), _EPS)


def random_pairs(groups: np.ndarray, n_pairs: int, seed: int = 0) -> np.ndarray:
    """``(n_pairs, 2)`` row indices of random pairs from *different* groups (e.g. documents), seeded."""
    groups = np.asarray(groups)
    if np.unique(groups).size < 2:
        raise ValueError("random pairs from different contexts need at least two groups")
    rng = np.random.default_rng(seed)
    pairs = np.empty((0, 2), dtype=np.int64)
    while len(pairs) < n_pairs:
        candidates = rng.integers(0, len(groups), size=(2 * n_pairs, 2))
        candidates = candidates[groups[candidates[:, 0]] != groups[candidates[:, 1]]]
        pairs = np.concatenate([pairs, candidates])
    return pairs[:n_pairs]


@dataclass(frozen=True)
class Anisotropy:
    """Mean cosine of random pairs and each dimension's share of it (the rogue-dimension analysis)."""

    mean_cosine: float
    cosine_share: np.ndarray  # (d,) mean CC_i over the pairs; sums to mean_cosine
    euclidean_share: np.ndarray  # (d,) mean Euclidean contribution over the pairs; sums to 1

    def top_share(self, k: int = 3) -> float:
        """The fraction of the mean cosine carried by the ``k`` dimensions with the largest share."""
        return float(np.sort(self.cosine_share)[::-1][:k].sum() / self.mean_cosine) if self.mean_cosine else 0.0


def anisotropy(states: np.ndarray, pairs: np.ndarray) -> Anisotropy:
    """Â = E cos(x, y) over ``pairs`` of rows, with per-dimension cosine and Euclidean shares."""
    u, v = _float64(states)[pairs[:, 0]], _float64(states)[pairs[:, 1]]
    cosine = cosine_contributions(u, v).mean(0)
    return Anisotropy(float(cosine.sum()), cosine, euclidean_contributions(u, v).mean(0))


def isoscore(states: np.ndarray) -> float:
    """IsoScore (Rudman et al. 2022): ≈ the fraction of dimensions used uniformly, in [0, 1].

    PCA-rotate, take per-axis variances, normalise them to norm √n, measure their distance δ from the
    all-ones vector, convert to the number k of dimensions used, and rescale to (k − 1)/(n − 1).
    """
    centred = _float64(states) - _float64(states).mean(0)
    n = centred.shape[1]
    variances = np.linalg.svd(centred, compute_uv=False) ** 2 / max(len(centred) - 1, 1)
    variances = np.pad(variances, (0, n - len(variances)))
    normalised = np.sqrt(n) * variances / max(np.linalg.norm(variances), _EPS)
    delta = np.linalg.norm(normalised - 1) / np.sqrt(2 * (n - np.sqrt(n)))
    k = (n - delta**2 * (n - np.sqrt(n))) ** 2 / n
    return float(np.clip((k - 1) / (n - 1), 0.0, 1.0))


def effective_rank(states: np.ndarray, centre: bool = True) -> float:
    """Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values, 1 to d."""
    matrix = _float64(states) - (_float64(states).mean(0) if centre else 0.0)
    singular = np.linalg.svd(matrix, compute_uv=False)
    p = singular / max(singular.sum(), _EPS)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def twonn(states: np.ndarray, fraction: float = 0.9) -> float:
    """Intrinsic dimension by TwoNN (Facco et al. 2017).

    μ_i = r2/r1 of each point's two nearest neighbours; the slope, through the origin, of −log(1 − F(μ))
    against log μ over the lowest ``fraction`` of μ. Duplicate points (r1 = 0) are dropped first.
    """
    points = np.unique(_float64(states), axis=0)
    squared = (points**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None] - 2 * points @ points.T, 0.0))
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, :2]
    mu = np.sort(nearest[:, 1] / np.maximum(nearest[:, 0], _EPS))
    keep = int(np.floor(fraction * len(mu)))
    x = np.log(mu[:keep])
    y = -np.log(1 - np.arange(1, keep + 1) / len(mu))
    return float((x @ y) / (x @ x))


def self_similarity(occurrences: np.ndarray) -> float:
    """Ethayarajh's SelfSim: mean cosine between the n occurrences of one word (pairs j ≠ k)."""
    units = _unit(occurrences)
    n = len(units)
    if n < 2:
        raise ValueError("self-similarity needs at least two occurrences")
    gram = units @ units.T
    return float((gram.sum() - np.trace(gram)) / (n * n - n))


def intra_sentence_similarity(sentence_states: np.ndarray) -> float:
    """Ethayarajh's IntraSim: mean cosine of each token's state with the sentence's mean state."""
    mean = _float64(sentence_states).mean(0)
    return float((_unit(sentence_states) @ _unit(mean)).mean())


def maximum_explainable_variance(occurrences: np.ndarray) -> float:
    """MEV: σ_1² / Σ σ_i² of the uncentred occurrence matrix of one word, in (0, 1]."""
    singular = np.linalg.svd(_float64(occurrences), compute_uv=False)
    return float(singular[0] ** 2 / max((singular**2).sum(), _EPS))


@dataclass(frozen=True)
class PostProcessing:
    """An affine map fitted on one set of states: x̃ = (x − shift) @ matrix."""

    name: str
    shift: np.ndarray
    matrix: np.ndarray

    def __call__(self, states: np.ndarray) -> np.ndarray:
        """Apply the fitted map to states ``(n, d)``."""
        return (_float64(states) - self.shift) @ self.matrix


def fit_post_processing(states: np.ndarray, name: str, top: int = 3, epsilon: float = 1e-9) -> PostProcessing:
    """Fit a post-processing on ``states``: ``none``, ``centre``, ``standardise``, ``whiten`` or ``all_but_the_top``.

    Whitening follows Su et al. (eigenvalues regularised by ``epsilon``); all-but-the-top (Mu & Viswanath)
    removes the mean and the top ``top`` principal components.
    """
    x = _float64(states)
    d = x.shape[1]
    mean = x.mean(0)
    if name == "none":
        return PostProcessing(name, np.zeros(d), np.eye(d))
    if name == "centre":
        return PostProcessing(name, mean, np.eye(d))
    if name == "standardise":
        std = x.std(0)
        return PostProcessing(name, mean, np.diag(1 / np.maximum(std, epsilon * max(np.median(std), _EPS))))
    covariance = np.cov(x - mean, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    if name == "whiten":
        return PostProcessing(name, mean, eigenvectors / np.sqrt(eigenvalues + epsilon))
    if name == "all_but_the_top":
        top_components = eigenvectors[:, :top]
        return PostProcessing(name, mean, np.eye(d) - top_components @ top_components.T)
    raise ValueError(f"unknown post-processing {name!r}; use none, centre, standardise, whiten or all_but_the_top")
