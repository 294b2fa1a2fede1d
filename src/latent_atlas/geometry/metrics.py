"""Qualities of a latent space (METHODS §8): anisotropy, rogue dimensions, isotropy, rank, intrinsic dimension.

Pure functions on arrays of states ``X`` (``(n, d)``, one row per token or passage), computed in float64.
Post-processings (centring, standardisation, whitening, all-but-the-top) are fitted on one set and applied
to any other, so that fitting and evaluating on different corpora is a deliberate choice.
"""

from collections.abc import Callable
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


SPECTRUM_METRICS = ("isoscore", "effective_rank")
WITH_MASSIVE = "_with_massive"  # suffix of the spectrum-based metrics computed with the massive tokens kept


def spectrum_metrics(variances: np.ndarray) -> dict[str, float]:
    """IsoScore and effective rank from the same principal-axis variances (the spectrum-based metrics)."""
    return {"isoscore": isoscore_from_variances(variances), "effective_rank": effective_rank_from_variances(variances)}


def is_powered(n: int, d: int, ratio: float) -> bool:
    """Whether ``n`` states are enough for a spectrum of dimension ``d``: n ≥ ratio · d (METHODS §8.3: 5-10 d)."""
    return n >= ratio * d


def weighted_pca_variances(states: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Principal-axis variances (descending, length d) of ``states`` with row i counted ``weights[i]`` times.

    Equal to :func:`pca_variances` of the rows repeated; with m < d rows kept it goes through their m × m Gram
    matrix (the same non-zero eigenvalues) and pads with zeros.
    """
    x, w = _float64(states), np.asarray(weights, dtype=np.float64)
    keep = w > 0
    x, w = x[keep], w[keep]
    total = w.sum()
    if total < 2:
        raise ValueError("a spectrum needs at least two (weighted) rows")
    centred = (x - (w @ x) / total) * np.sqrt(w)[:, None]
    gram = centred @ centred.T if len(x) < x.shape[1] else centred.T @ centred
    eigenvalues = np.sort(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[::-1]
    variances = np.zeros(x.shape[1])
    variances[: len(eigenvalues)] = eigenvalues / (total - 1)
    return variances


_GROUP_MOMENTS_BYTES = 2**30  # per-group second moments are kept while they fit in this (272 documents x d=576: 0.7 GB)
MIN_BOOTSTRAP_GROUPS = 5  # below this, a resample of whole groups says little (3 groups: 10 distinct resamples)


def _replicate_variances(states: np.ndarray, inverse: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function from per-group draw counts to the principal-axis variances of the rows so repeated.

    The same values as :func:`weighted_pca_variances` of ``counts[inverse]``, made cheap per replicate:
    with fewer rows than dimensions from the rows' Gram matrix, else from per-group moments (when they fit
    in memory), else from the weighted rows.
    """
    x = _float64(states)
    x = x - x.mean(0)
    n, d = x.shape
    groups = int(inverse.max()) + 1
    if n < d:
        gram = x @ x.T

        def from_gram(counts: np.ndarray) -> np.ndarray:
            weights = counts[inverse].astype(np.float64)
            keep = weights > 0
            w, kernel = weights[keep], gram[np.ix_(keep, keep)]
            total = w.sum()
            projection = kernel @ w / total  # x_i · μ for the weighted mean μ
            centred = kernel - projection[:, None] - projection[None, :] + w @ projection / total
            root = np.sqrt(w)
            eigenvalues = np.sort(np.clip(np.linalg.eigvalsh(centred * root[:, None] * root[None, :]), 0, None))
            variances = np.zeros(d)
            variances[: len(eigenvalues)] = eigenvalues[::-1] / (total - 1)
            return variances

        return from_gram
    if groups * d * d * 8 > _GROUP_MOMENTS_BYTES:
        return lambda counts: weighted_pca_variances(x, counts[inverse])
    second, sums = np.empty((groups, d * d)), np.empty((groups, d))
    for group in range(groups):
        rows = x[inverse == group]
        second[group], sums[group] = (rows.T @ rows).ravel(), rows.sum(0)
    sizes = np.bincount(inverse, minlength=groups)

    def from_moments(counts: np.ndarray) -> np.ndarray:
        total = float(counts @ sizes)
        mean = counts @ sums / total
        covariance = ((counts @ second).reshape(d, d) - total * np.outer(mean, mean)) / (total - 1)
        return np.clip(np.linalg.eigvalsh(covariance)[::-1], 0.0, None)

    return from_moments


def cluster_bootstrap(
    states: np.ndarray, groups: np.ndarray, replicates: int, confidence: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Basic bootstrap intervals of IsoScore and effective rank, resampling whole groups (documents).

    Each replicate draws as many groups as there are, with replacement, and counts every row of a group as
    often as the group was drawn (tokens of one document are not independent). The interval is the basic
    (reverse-percentile) one, (2θ̂ − q_high, 2θ̂ − q_low) of the replicates' quantiles: it moves by the
    bootstrap's estimate of the plug-in's small-sample bias, which the percentile interval keeps (an
    isotropic Gaussian's IsoScore is ≈ 1 − d/n, and its percentile interval lies entirely below that).
    Clipped to each metric's range; NaN with fewer than ``MIN_BOOTSTRAP_GROUPS`` groups. ``states`` is
    ``(n, d)``, ``groups`` ``(n,)``.
    """
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if len(names) < MIN_BOOTSTRAP_GROUPS or replicates < 1:
        return {metric: (float("nan"), float("nan")) for metric in SPECTRUM_METRICS}
    estimate = spectrum_metrics(pca_variances(states))
    variances = _replicate_variances(states, inverse)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        counts = np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))
        draws.append(spectrum_metrics(variances(counts)))
    tail = (1 - confidence) / 2
    ranges = {"isoscore": (0.0, 1.0), "effective_rank": (1.0, float(np.shape(states)[1]))}
    intervals = {}
    for metric in SPECTRUM_METRICS:
        low, high = np.quantile([draw[metric] for draw in draws], [tail, 1 - tail])
        bounds = ranges[metric]
        intervals[metric] = (
            float(np.clip(2 * estimate[metric] - high, *bounds)),
            float(np.clip(2 * estimate[metric] - low, *bounds)),
        )
    return intervals


def massive_rows(norms: np.ndarray, eligible: np.ndarray, multiple: float) -> np.ndarray:
    """Eligible rows whose norm exceeds ``multiple`` × the median norm of the eligible rows.

    Sun et al. (2024)'s massive activations, found by token norm: a handful of tokens whose states are tens
    of times longer than the rest and that alone decide a spectrum. ``norms`` and ``eligible`` are ``(n,)``.
    """
    norms, eligible = np.asarray(norms, dtype=np.float64), np.asarray(eligible, dtype=bool)
    if not eligible.any():
        return np.zeros(len(norms), dtype=bool)
    return eligible & (norms > multiple * float(np.median(norms[eligible])))


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


def mean_intra_sentence_similarity(states: np.ndarray, sentences: np.ndarray) -> tuple[float, int]:
    """IntraSim per sentence (Ethayarajh 2019), averaged over the sentences with at least two tokens.

    ``states`` is ``(n, d)``, ``sentences`` the sentence id of each row; returns the mean and how many
    sentences it averages (NaN and 0 when none has two tokens).
    """
    ids, counts = np.unique(np.asarray(sentences), return_counts=True)
    values = [intra_sentence_similarity(states[sentences == i]) for i in ids[counts > 1]]
    return (float(np.mean(values)), len(values)) if values else (float("nan"), 0)


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
POST_PROCESSINGS = (*AFFINE_POST_PROCESSINGS, "flow")  # the flow is fitted in geometry.flow (torch)


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


# --------------------------------------------------------------------------------------------------
# Document bootstrap of pair statistics (mean cosine, rogue shares, register separability)


def document_draws(n_documents: int, replicates: int, seed: int = 0) -> np.ndarray:
    """``(replicates, n_documents)`` counts: how often each document is drawn in each bootstrap replicate.

    Drawn once per store and seed and reused at every layer and post-processing, so that replicate ``k``
    resamples the same documents everywhere and differences (layer vs layer 0, processed vs raw) are paired.
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_documents, np.full(n_documents, 1.0 / n_documents), size=replicates).astype(np.float64)


def pair_weights(draws: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Each pair's weight in each replicate: the product of its two documents' draw counts.

    A statistic of pairs from different documents (a U-statistic) is resampled by drawing documents: a pair
    whose documents are drawn a and b times counts a·b times, and pairs of a document with itself never
    appear. ``first``/``second`` are the pairs' document positions (columns of ``draws``).
    """
    return draws[:, first] * draws[:, second]


def pair_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per replicate, the weighted mean of per-pair ``values`` (``(pairs,)`` or ``(pairs, d)``).

    A ``(pairs, d)`` product runs in float32 (the replicates × pairs × d matmul dominates the geometry job's
    bootstrap; its rounding is far below the interval's width).
    """
    total = weights.sum(1)
    total = np.where(total > 0, total, np.nan)
    if values.ndim == 1:
        return (weights @ values) / total
    return (weights.astype(np.float32) @ values.astype(np.float32)).astype(np.float64) / total[:, None]


def top_shares(cosine_share: np.ndarray, k: int = 3) -> np.ndarray:
    """:meth:`Anisotropy.top_share` of each row of ``(replicates, d)`` mean contributions."""
    magnitude = np.abs(cosine_share)
    top = -np.sort(-magnitude, axis=1)[:, :k].sum(1)
    return top / np.maximum(magnitude.sum(1), _EPS)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray, block: int = 64) -> np.ndarray:
    """Per replicate (rows of ``weights``), the ROC AUC of ``scores`` for ``positive`` with weighted pairs.

    AUC = Σ_{p pos, q neg} w_p w_q [s_p > s_q] / (Σ w_pos · Σ w_neg), ties counted as a half. Replicates are
    handled ``block`` at a time (memory ``block × pairs``).
    """
    order = np.argsort(scores, kind="stable")
    scores, positive = scores[order], positive[order]
    _, first, counts = np.unique(scores, return_index=True, return_counts=True)
    tie_group = np.repeat(np.arange(len(first)), counts)
    result = np.empty(len(weights))
    for start in range(0, len(weights), block):
        w = weights[start : start + block][:, order]
        negative = np.where(positive, 0.0, w)
        group_neg = np.add.reduceat(negative, first, axis=1)
        group_start = np.cumsum(group_neg, axis=1) - group_neg  # negatives of strictly lower scores
        below = group_start[:, tie_group] + 0.5 * group_neg[:, tie_group]
        pos = np.where(positive, w, 0.0)
        denominator = pos.sum(1) * negative.sum(1)
        result[start : start + block] = (pos * below).sum(1) / np.where(denominator > 0, denominator, np.nan)
    return result
