"""Exact nearest stored activations, by blocked matrix products over the HDF5 store.

A layer that fits ``cache_bytes`` (float32, prepared) is read once and kept in RAM for the next searches of
that layer (one layer at a time); the queries are scored against it in blocks sized to the CPU cache, each
block's top-k merged at the end. A larger layer is never loaded whole: one pass reads ``block_rows`` states at
a time, scores every query against the block and keeps a running top-k. The same blocked pass gives the
per-layer statistics that standardisation, relative radii and rogue dimensions need (:func:`layer_statistics`).
Position 0 (the attention sink, METHODS §0.4) is left out by default, as everywhere in the project's geometry.
"""

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from latent_atlas.addresses import resid_address
from latent_atlas.store import ActivationStore

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[Metric, ...] = ("cosine", "euclidean")
DEFAULT_BLOCK_ROWS = 8192
DEFAULT_CACHE_BYTES = 1 << 30  # a prepared float32 layer up to 1 GiB is kept in RAM between searches
_SCORE_BLOCK_VALUES = 1 << 21  # queries x cached rows scored at once: 8 MiB of float32, about an L2/L3 share
_EUCLIDEAN_MARGIN = 8
_STD_FLOOR = 1e-6  # relative to the median std: METHODS §8.2 "clip tiny σ"


@dataclass(frozen=True)
class LayerStatistics:
    """Statistics of one stored address, over the rows kept (first positions excluded by default).

    ``cosine_share[i]`` is dimension i's expected contribution CC_i to the cosine of two different stored
    states (Timkey & van Schijndel; METHODS §8.2), averaged exactly over all pairs of kept rows; the shares
    sum to the mean pairwise cosine.
    """

    address: str
    n_rows: int
    mean: np.ndarray
    std: np.ndarray
    typical_norm: float
    cosine_share: np.ndarray

    def standardise(self, states: np.ndarray) -> np.ndarray:
        """Standardise states: (x − μ) / σ per dimension, σ clipped away from zero."""
        floor = _STD_FLOOR * float(np.median(self.std))
        return ((states - self.mean) / np.maximum(self.std, floor)).astype(np.float32)


@dataclass(frozen=True)
class Neighbours:
    """The k nearest stored rows of each query, best first."""

    rows: np.ndarray  # (q, k) int64 store rows
    scores: np.ndarray  # (q, k) cosine similarity (higher is nearer) or Euclidean distance (lower is nearer)
    metric: Metric
    standardised: bool


def kept_rows(store: ActivationStore, skip_first_position: bool = True) -> np.ndarray:
    """Boolean mask of the store rows that searches and statistics use."""
    if not skip_first_position:
        return np.ones(store.n_tokens, dtype=bool)
    return store.tokens()["pos"].to_numpy() > 0


def iter_blocks(
    store: ActivationStore, address: str, block_rows: int = DEFAULT_BLOCK_ROWS
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first row, float32 states)`` for consecutive blocks of one address.

    Blocks are read into one reused buffer of the stored dtype and converted once.
    """
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    buffer = np.empty((min(block_rows, store.n_tokens), store.d_model), dtype=store.stored_dtype(address))
    for start in range(0, store.n_tokens, block_rows):
        raw = store.read_into(address, start, buffer[: min(block_rows, store.n_tokens - start)])
        yield start, torch.from_numpy(raw).float().numpy()


def typical_norm(
    store: ActivationStore, layer: int | str, skip_first_position: bool = True, block_rows: int = DEFAULT_BLOCK_ROWS
) -> float:
    """The median ‖h‖ of stored states at one address (first positions left out by default).

    The same number as ``layer_statistics(...).typical_norm`` (up to float32 rounding of the norms), without
    the float64 moments: a fraction of the cost when only a scale is needed.
    """
    address = resid_address(layer) if isinstance(layer, int) else layer
    keep = kept_rows(store, skip_first_position)
    norms = [
        torch.from_numpy(block[keep[start : start + len(block)]]).norm(dim=-1).numpy()
        for start, block in iter_blocks(store, address, block_rows)
    ]
    return float(np.median(np.concatenate(norms)))


def layer_statistics(
    store: ActivationStore,
    layer: int | str,
    skip_first_position: bool = True,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> LayerStatistics:
    """Mean, std (Chan's pairwise merge, float64), median norm and cosine shares of one address."""
    address = resid_address(layer) if isinstance(layer, int) else layer
    keep = kept_rows(store, skip_first_position)
    count, mean, m2 = 0, np.zeros(store.d_model), np.zeros(store.d_model)
    unit_sum, unit_square_sum = np.zeros(store.d_model), np.zeros(store.d_model)
    norms = []
    for start, block in iter_blocks(store, address, block_rows):
        states = block[keep[start : start + len(block)]].astype(np.float64)
        if not len(states):
            continue
        block_mean = states.mean(0)
        block_m2 = ((states - block_mean) ** 2).sum(0)
        total = count + len(states)
        delta = block_mean - mean
        mean = mean + delta * len(states) / total
        m2 = m2 + block_m2 + delta**2 * count * len(states) / total
        count = total
        block_norms = np.linalg.norm(states, axis=1)
        units = states / np.maximum(block_norms, 1e-12)[:, None]
        unit_sum += units.sum(0)
        unit_square_sum += (units**2).sum(0)
        norms.append(block_norms)
    if count < 2:
        raise ValueError(f"{store.path}: {address} has {count} usable rows; statistics need at least 2")
    cosine_share = (unit_sum**2 - unit_square_sum) / (count * (count - 1))
    return LayerStatistics(
        address=address,
        n_rows=count,
        mean=mean,
        std=np.sqrt(m2 / count),
        typical_norm=float(np.median(np.concatenate(norms))),
        cosine_share=cosine_share,
    )


def _prepare(states: np.ndarray, metric: Metric, statistics: LayerStatistics | None) -> torch.Tensor:
    """Standardise (optionally), then unit-normalise for cosine; float32 tensor."""
    prepared = statistics.standardise(states) if statistics is not None else states.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(prepared))
    if metric == "cosine":
        tensor = tensor / tensor.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return tensor


def nearest_stored(
    store: ActivationStore,
    layer: int | str,
    queries: np.ndarray,
    k: int = 10,
    metric: Metric = "cosine",
    statistics: LayerStatistics | None = None,
    skip_first_position: bool = True,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Neighbours:
    """Exact k nearest stored states of each query at one address.

    Args:
        store: an open activation store.
        layer: a layer number or an address (``resid.LL``, ``ln_final``).
        queries: ``(q, d)`` states at the same address.
        k: neighbours per query (fewer if fewer rows are kept).
        metric: ``cosine`` (similarity, descending) or ``euclidean`` (distance, ascending).
        statistics: when given, queries and stored states are standardised with its mean and std first.
        skip_first_position: leave out every document's position 0 (the attention sink).
        block_rows: stored rows per block when the layer is not cached; memory is O(block_rows · (d + q)).
        cache_bytes: the largest prepared layer (kept rows x d x 4 bytes) kept in RAM for later searches;
            0 never caches.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    address = resid_address(layer) if isinstance(layer, int) else layer
    query = _prepare(np.atleast_2d(queries), metric, statistics)
    cached = _cached_layer(store, address, metric, statistics, skip_first_position, cache_bytes)
    n_kept = len(cached.rows) if cached is not None else int(kept_rows(store, skip_first_position).sum())
    wanted = min(k, n_kept)
    # Euclidean candidates are re-ranked by exact distances: search a margin beyond k so that rounding in
    # the expanded form cannot push a true neighbour out.
    k = min(wanted + _EUCLIDEAN_MARGIN, n_kept) if metric == "euclidean" else wanted
    if cached is not None:
        best_scores, best_rows = _search_cached(cached, query, k, metric)
    else:
        best_scores, best_rows = _search_blocks(store, address, query, k, metric, statistics, skip_first_position,
                                                block_rows)  # fmt: skip
    rows, values = best_rows.numpy(), best_scores.double().numpy()
    if metric == "euclidean":
        rows, values = _exact_distances(store, address, query.double().numpy(), rows, statistics)
    rows, values = rows[:, :wanted], values[:, :wanted]
    return Neighbours(rows, values, metric, statistics is not None)


def _scores(
    query: torch.Tensor,
    stored: torch.Tensor,
    metric: Metric,
    stored_norm2: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine similarity, or the negative squared distance without ‖q‖² (larger is nearer for both).

    ``out``, a ``(len(query), len(stored))`` view, receives them (a buffer reused across blocks).
    """
    products = torch.mm(query, stored.T, out=out) if out is not None else query @ stored.T
    if metric == "cosine":
        return products
    norm2 = stored_norm2 if stored_norm2 is not None else (stored**2).sum(-1)
    return products.mul_(2).sub_(norm2)


def _search_blocks(
    store: ActivationStore,
    address: str,
    query: torch.Tensor,
    k: int,
    metric: Metric,
    statistics: LayerStatistics | None,
    skip_first_position: bool,
    block_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the store, ``block_rows`` at a time, keeping a running top-k: (scores, rows)."""
    keep = torch.from_numpy(kept_rows(store, skip_first_position))
    best_scores = torch.empty(len(query), 0)
    best_rows = torch.empty(len(query), 0, dtype=torch.int64)
    for start, block in iter_blocks(store, address, block_rows):
        scores = _scores(query, _prepare(block, metric, statistics), metric, None)
        scores[:, ~keep[start : start + len(block)]] = -torch.inf
        rows = torch.arange(start, start + len(block)).expand(len(query), -1)
        best_scores, index = torch.cat([best_scores, scores], 1).topk(min(k, best_scores.shape[1] + len(block)), 1)
        best_rows = torch.cat([best_rows, rows], 1).gather(1, index)
    return best_scores, best_rows


def _search_cached(
    cached: "_CachedLayer", query: torch.Tensor, k: int, metric: Metric
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the queries against the cached layer in cache-sized blocks; merge each block's top-k: (scores, rows)."""
    n = len(cached.rows)
    step = max(k, 1024, _SCORE_BLOCK_VALUES // max(len(query), 1))
    buffer = torch.empty(len(query), min(n, step))  # one allocation: a fresh block each costs ~15 % in page faults
    candidates, indices = [], []
    for start in range(0, n, step):
        stored = cached.states[start : start + step]
        norm2 = cached.norm2[start : start + step] if cached.norm2 is not None else None
        block = _scores(query, stored, metric, norm2, out=buffer[:, : len(stored)])
        scores, index = block.topk(min(k, len(stored)), 1)
        candidates.append(scores)
        indices.append(index + start)
    scores, index = torch.cat(candidates, 1).topk(k, 1)
    return scores, cached.rows[torch.cat(indices, 1).gather(1, index)]


@dataclass(frozen=True)
class _CachedLayer:
    """A prepared layer in RAM: the kept rows' states (standardised, unit-normed for cosine) and store rows."""

    key: tuple
    states: torch.Tensor
    rows: torch.Tensor
    norm2: torch.Tensor | None  # squared norms, for Euclidean scores


_CACHE: list[_CachedLayer] = []  # at most one layer


def _cached_layer(
    store: ActivationStore,
    address: str,
    metric: Metric,
    statistics: LayerStatistics | None,
    skip_first_position: bool,
    cache_bytes: int,
) -> _CachedLayer | None:
    """The prepared layer from RAM, read once if it fits ``cache_bytes``; None when it does not."""
    if store.n_tokens * store.d_model * 4 > cache_bytes:
        return None
    status = os.stat(store.path)
    standardisation = None if statistics is None else (statistics.mean.tobytes(), statistics.std.tobytes())
    key = (str(store.path), status.st_mtime_ns, status.st_size, address, metric, skip_first_position, standardisation)
    if _CACHE and _CACHE[0].key == key:
        return _CACHE[0]
    _CACHE.clear()
    keep = kept_rows(store, skip_first_position)
    states = _prepare(store.read(address)[keep], metric, statistics)
    norm2 = (states**2).sum(-1) if metric == "euclidean" else None
    _CACHE.append(_CachedLayer(key, states, torch.from_numpy(np.flatnonzero(keep)), norm2))
    return _CACHE[0]


def _exact_distances(
    store: ActivationStore,
    address: str,
    query: np.ndarray,
    rows: np.ndarray,
    statistics: LayerStatistics | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Recompute the found rows' distances directly and re-sort each query's neighbours by them.

    The blocked search expands ‖q − x‖², which loses precision for near-identical states.
    """
    unique, inverse = np.unique(rows, return_inverse=True)
    stored = (
        _prepare(store.read(address, unique), "euclidean", statistics).double().numpy()[inverse.reshape(rows.shape)]
    )
    distances = np.linalg.norm(stored - query[:, None, :], axis=-1)
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(rows, order, 1), np.take_along_axis(distances, order, 1)


def token_contexts(
    store: ActivationStore, decode: Callable[[list[int]], str], rows: Sequence[int], window: int = 8
) -> list[str]:
    """The text around each stored row's token, the token itself in ⟦brackets⟧, ``window`` tokens each side.

    ``decode`` turns token ids into text (a tokenizer's ``decode``).
    """
    tokens = store.tokens()
    ids, pos = tokens["token_id"].to_numpy(), tokens["pos"].to_numpy()
    counts = store.docs()["token_count"].to_numpy()[tokens["doc"].to_numpy()]
    contexts = []
    for row in map(int, rows):
        left = row - min(window, int(pos[row]))
        right = row + min(window, int(counts[row] - pos[row] - 1))
        before, token = decode(ids[left:row].tolist()), decode([int(ids[row])])
        contexts.append(f"{before}⟦{token}⟧{decode(ids[row + 1 : right + 1].tolist())}")
    return contexts
