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
        """The share of the ``k`` largest per-dimension contributions: Σ_top-k |CC_i| / Σ_i |CC_i|.

        Equal to Timkey & van Schijndel's CC_i / Â summed over the top ``k`` when every contribution is
        positive (raw states), and still defined after centring, where Â ≈ 0 and CC_i / Â is not.
        """
        magnitude = np.abs(self.cosine_share)
        total = magnitude.sum()
        return float(np.sort(magnitude)[::-1][:k].sum() / total) if total else 0.0


def anisotropy(states: np.ndarray, pairs: np.ndarray) -> Anisotropy:
    """Â = E cos(x, y) over ``pairs`` of rows, with per-dimension cosine and Euclidean shares."""
    u, v = _float64(states)[pairs[:, 0]], _float64(states)[pairs[:, 1]]
    cosine = cosine_contributions(u, v).mean(0)
    return Anisotropy(float(cosine.sum()), cosine, euclidean_contributions(u, v).mean(0))


def pca_variances(states: np.ndarray) -> np.ndarray:
    """Variances along the principal axes of ``states`` (descending, length d), from the d × d covariance."""
    return np.clip(np.linalg.eigvalsh(Moments.of(states).covariance)[::-1], 0.0, None)


def principal_axes(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors (columns) of a covariance matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    return np.clip(eigenvalues[::-1], 0.0, None), np.ascontiguousarray(eigenvectors[:, ::-1])


def whitening_floor(eigenvalues: np.ndarray, epsilon: float) -> float:
    """The eigenvalue floor ε·mean(Λ) that keeps whitening finite when the covariance is rank-deficient."""
    return epsilon * max(float(eigenvalues.mean()), _EPS)


def isoscore_from_variances(variances: np.ndarray) -> float:
    """IsoScore from the principal-axis variances (steps 3-6 of Rudman et al. 2022)."""
    n = len(variances)
    normalised = np.sqrt(n) * variances / max(np.linalg.norm(variances), _EPS)
    delta = np.linalg.norm(normalised - 1) / np.sqrt(2 * (n - np.sqrt(n)))
    k = (n - delta**2 * (n - np.sqrt(n))) ** 2 / n
    return float(np.clip((k - 1) / (n - 1), 0.0, 1.0))


def isoscore(states: np.ndarray) -> float:
    """IsoScore (Rudman et al. 2022): ≈ the fraction of dimensions used uniformly, in [0, 1].

    PCA-rotate, take per-axis variances, normalise them to norm √n, measure their distance δ from the
    all-ones vector, convert to the number k of dimensions used, and rescale to (k − 1)/(n − 1).
    """
    return isoscore_from_variances(pca_variances(states))


def effective_rank_from_variances(variances: np.ndarray) -> float:
    """Effective rank from principal-axis variances: the singular values of the centred data are √variance."""
    singular = np.sqrt(np.clip(variances, 0.0, None))
    p = singular / max(singular.sum(), _EPS)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(states: np.ndarray, centre: bool = True) -> float:
    """Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values, 1 to d."""
    matrix = _float64(states) - (_float64(states).mean(0) if centre else 0.0)
    singular = np.linalg.svd(matrix, compute_uv=False)
    return effective_rank_from_variances(singular**2)


def _two_nearest(points: np.ndarray, block: int, candidates: int = 4) -> np.ndarray:
    """Distances ``(n, 2)`` from each point to its two nearest others.

    Candidates come from float32 blocked distances (memory ``block × n``); the ``candidates`` best are
    re-measured exactly in float64, so float32 rounding cannot reorder the two that count.
    """
    single = points.astype(np.float32)
    squared = (single**2).sum(1)
    nearest = np.empty((len(points), 2))
    keep = min(candidates, len(points) - 1)
    for start in range(0, len(points), block):
        rows = np.arange(start, min(start + block, len(points)))
        distances = squared[rows, None] + squared[None] - 2 * single[rows] @ single.T
        distances[np.arange(len(rows)), rows] = np.inf
        best = np.argpartition(distances, keep - 1, axis=1)[:, :keep]
        exact = np.linalg.norm(points[best] - points[rows, None], axis=-1)
        nearest[rows] = np.sort(exact, axis=1)[:, :2]
    return nearest


def twonn(states: np.ndarray, fraction: float = 0.9, block: int = 1024) -> float:
    """Intrinsic dimension by TwoNN (Facco et al. 2017).

    μ_i = r2/r1 of each point's two nearest neighbours; the slope, through the origin, of −log(1 − F(μ))
    against log μ over the lowest ``fraction`` of μ. Duplicate points (r1 = 0) are dropped first.
    """
    points = np.unique(_float64(states), axis=0)
    nearest = _two_nearest(points - points.mean(0), block)
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


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


@dataclass(frozen=True)
class Moments:
    """First and second moments of a set of states, enough to fit every affine post-processing."""

    count: int
    mean: np.ndarray  # (d,)
    covariance: np.ndarray  # (d, d), unbiased

    @classmethod
    def of(cls, states: np.ndarray) -> "Moments":
        """The moments of an in-memory array."""
        x = _float64(states)
        centred = x - x.mean(0)
        return cls(len(x), x.mean(0), centred.T @ centred / max(len(x) - 1, 1))


class MomentAccumulator:
    """Streams blocks of states into exact float64 moments (sums taken about the first block's mean)."""

    def __init__(self, d: int) -> None:
        self.count = 0
        self._reference: np.ndarray | None = None
        self._sum = np.zeros(d)
        self._outer = np.zeros((d, d))

    def add(self, block: np.ndarray) -> None:
        """Add rows ``(n, d)``."""
        if not len(block):
            return
        x = _float64(block)
        if self._reference is None:
            self._reference = x.mean(0)
        shifted = x - self._reference
        self.count += len(x)
        self._sum += shifted.sum(0)
        self._outer += shifted.T @ shifted

    def moments(self) -> Moments:
        """The moments of every row added so far."""
        if self._reference is None or self.count < 2:
            raise ValueError("moments need at least two rows")
        mean_shift = self._sum / self.count
        covariance = (self._outer - self.count * np.outer(mean_shift, mean_shift)) / (self.count - 1)
        return Moments(self.count, self._reference + mean_shift, covariance)


@dataclass(frozen=True)
class PostProcessing:
    """An affine map fitted on one set of states: x̃ = (x − shift) @ matrix."""

    name: str
    shift: np.ndarray
    matrix: np.ndarray

    def __call__(self, states: np.ndarray) -> np.ndarray:
        """Apply the fitted map to states ``(n, d)``."""
        return (_float64(states) - self.shift) @ self.matrix


AFFINE_POST_PROCESSINGS = ("none", "centre", "standardise", "whiten", "all_but_the_top")


def fit_post_processing(states: np.ndarray, name: str, top: int = 3, epsilon: float = 1e-9) -> PostProcessing:
    """Fit a post-processing on ``states``: ``none``, ``centre``, ``standardise``, ``whiten`` or ``all_but_the_top``.

    Whitening follows Su et al. (eigenvalues regularised by ``epsilon`` times their mean, so that a
    rank-deficient covariance stays finite); all-but-the-top (Mu & Viswanath)
    removes the mean and the top ``top`` principal components.
    """
    return post_processing_from_moments(Moments.of(states), name, top, epsilon)


def post_processing_from_moments(moments: Moments, name: str, top: int = 3, epsilon: float = 1e-9) -> PostProcessing:
    """Fit a post-processing from (possibly streamed) moments; see :func:`fit_post_processing`."""
    d = len(moments.mean)
    if name not in AFFINE_POST_PROCESSINGS:
        raise ValueError(f"unknown post-processing {name!r}; use one of {', '.join(AFFINE_POST_PROCESSINGS)}")
    if name == "none":
        return PostProcessing(name, np.zeros(d), np.eye(d))
    if name == "centre":
        return PostProcessing(name, moments.mean, np.eye(d))
    if name == "standardise":
        std = np.sqrt(np.clip(np.diag(moments.covariance), 0.0, None))
        floor = epsilon * max(float(np.median(std)), _EPS)
        return PostProcessing(name, moments.mean, np.diag(1 / np.maximum(std, floor)))
    eigenvalues, eigenvectors = principal_axes(moments.covariance)
    if name == "whiten":
        return PostProcessing(
            name, moments.mean, eigenvectors / np.sqrt(eigenvalues + whitening_floor(eigenvalues, epsilon))
        )
    top_components = eigenvectors[:, :top]
    return PostProcessing(name, moments.mean, np.eye(d) - top_components @ top_components.T)
