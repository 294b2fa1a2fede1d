"""Per-layer geometry of an activation store (METHODS §8), before and after post-processing, per register.

One streamed pass over each selected layer gathers everything: the exact moments of the *fitting* split
(every post-processing is fitted there), a whole-document sample of the *measured* split (metrics are
computed there, so that a post-processing is judged on text it was not fitted on), a sample of the fitting
split for the linear probes, pooled (mean) states of up to ``max_sentences`` fitting sentences and of the
measured passages. Memory is ``O((max_states + max_sentences) · d + d²)`` whatever the store's size.

Token-level metrics (per processing, for all tokens and per register): mean cosine of random pairs from
different passages and the rogue-dimension shares of it, IsoScore, effective rank, TwoNN, norms,
Ethayarajh's self-similarity, intra-sentence similarity and MEV with their baselines. Position 0 (the
attention sink) is left out by default. Spectrum-based metrics (IsoScore, effective rank) carry their sample
size ``n``, whether it is powered (n ≥ ``power_ratio`` · d), a document-bootstrap interval, and come twice:
without the layer's massive tokens (norm above ``massive_multiple`` × the layer's median; the figures' value)
and with them (``*_with_massive``); the massive tokens themselves are listed per layer. Passage-level: how
well cosine of pooled passage states separates same-register from different-register pairs (ROC AUC), with
each post-processing fitted on pooled sentence states of the fitting split, as BERT-flow is (Li et al.
2020); the flow is then also applied to token states.
Mickus et al.'s confound: logistic probes for position bucket and register, with shuffled-label controls.
"""

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.nn import functional

from latent_atlas.config import select_layers
from latent_atlas.errors import ConfigError, StoreError
from latent_atlas.geometry.flow import FittedFlow, FlowSettings, fit_flow
from latent_atlas.geometry.metrics import (
    POST_PROCESSINGS,
    WITH_MASSIVE,
    Anisotropy,
    MomentAccumulator,
    Moments,
    anisotropy,
    cluster_bootstrap,
    cosine_contributions,
    document_draws,
    is_powered,
    massive_rows,
    maximum_explainable_variance,
    mean_intra_sentence_similarity,
    pair_means,
    pair_weights,
    pca_variances,
    post_processing_from_moments,
    random_pairs,
    rank_average,
    self_similarity,
    spectrum_metrics,
    top_shares,
    twonn,
    weighted_auc,
)
from latent_atlas.stats import percentile_interval
from latent_atlas.store import ActivationStore

log = logging.getLogger(__name__)
ALL_REGISTERS = "all"
_SENTENCE_END = re.compile(r"[.!?]['\"”’)\]]*\s*$")
_BLOCK_ROWS = 8192
METRIC_SCHEMA = {
    "layer": pl.Int64,
    "register": pl.String,
    "processing": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "n": pl.Int64,  # rows (tokens, passages or sentences) the value is computed on
    "documents": pl.Int64,  # spectrum-based rows: documents behind the n rows (the bootstrap's unit)
    "powered": pl.Boolean,  # spectrum-based rows: n >= power_ratio * d
    "ci_low": pl.Float64,  # spectrum-based rows of bootstrap_processings: the bootstrap interval
    "ci_high": pl.Float64,
    "massive_tokens": pl.String,  # 'removed' (figures' spectrum value) or 'kept' (every other row)
    "unit": pl.String,  # rows with an interval: what it resamples ('document')
}
PAIR_REPLICATES = 1000  # document-bootstrap replicates of the pair statistics (percentile intervals)
SHARE_PROCESSINGS = ("none", "standardise")  # where the rogue-dimension share gets an interval (Timkey's pair)
CHANGE_METRICS = ("mean_cosine_change", "passage_register_auc_change")
MASSIVE_SCHEMA = {
    "layer": pl.Int64,
    "doc_id": pl.String,
    "split": pl.String,
    "register": pl.String,
    "position": pl.Int64,
    "token_id": pl.Int64,
    "token": pl.String,
    "norm": pl.Float64,
    "median_norm": pl.Float64,
    "ratio": pl.Float64,
    "measured": pl.Boolean,  # in the measured sample (so removed from its spectrum-based metrics)
}

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GeometrySettings:
    """The ``geometry`` config section (see the schema for each key)."""

    layers: Any = field(default_factory=lambda: {"every": 3})
    split: str = "heldout"
    fit_split: str = "train"
    include_first_position: bool = False
    max_states: int = 8192
    max_sentences: int = 20000
    pairs: int = 5000
    twonn_states: int = 4000
    processings: tuple[str, ...] = POST_PROCESSINGS
    register_processings: tuple[str, ...] = ("none",)
    register_states: int = 512
    power_ratio: float = 5.0
    bootstrap: int = 100
    bootstrap_processings: tuple[str, ...] = ("none",)
    confidence: float = 0.95
    massive_multiple: float = 10.0
    all_but_the_top: int | None = None
    words: int = 200
    min_occurrences: int = 5
    max_occurrences: int = 32
    position_buckets: tuple[int, ...] = (1, 4, 16, 64)
    probe_l2: float = 1e-3
    probe_steps: int = 30
    flow: FlowSettings = field(default_factory=FlowSettings)
    seed: int = 0

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "GeometrySettings":
        """Build from the config section, rejecting unknown keys and post-processings by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) geometry.{', geometry.'.join(unknown)}; valid: {sorted(known)}")
        values = dict(section)
        for key in ("processings", "register_processings", "bootstrap_processings", "position_buckets"):
            if key in values:
                values[key] = tuple(values[key])
        if "flow" in values:
            values["flow"] = FlowSettings.from_config(values["flow"])
        settings = cls(**values)
        for key in ("processings", "register_processings", "bootstrap_processings"):
            bad = [name for name in getattr(settings, key) if name not in POST_PROCESSINGS]
            if bad:
                raise ConfigError(f"geometry.{key} names {bad}; valid post-processings: {list(POST_PROCESSINGS)}")
        for key in ("register_processings", "bootstrap_processings"):
            missing = [name for name in getattr(settings, key) if name not in settings.processings]
            if missing:
                raise ConfigError(f"geometry.{key} {missing} must also be in geometry.processings")
        return settings

    def __post_init__(self) -> None:
        """Reject numbers outside their range, naming the key."""
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ConfigError(f"geometry.bootstrap must be an integer >= 0 (0: no intervals), got {self.bootstrap!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"geometry.confidence must lie in (0, 1), e.g. 0.95; got {self.confidence!r}")
        if not self.massive_multiple > 1:
            raise ConfigError(
                "geometry.massive_multiple must exceed 1 (it multiplies the median norm), "
                f"got {self.massive_multiple!r}"
            )
        if not self.power_ratio > 0:
            raise ConfigError(f"geometry.power_ratio must be positive (e.g. 5), got {self.power_ratio!r}")


@dataclass(frozen=True)
class GeometryResult:
    """Tables of one store: metrics (long format), rogue dimensions, the flows' losses and the massive tokens."""

    metrics: pl.DataFrame
    rogue: pl.DataFrame
    flow_losses: pl.DataFrame
    massive: pl.DataFrame


# --------------------------------------------------------------------------------------------------
# The token table: which rows are fitted on, measured, pooled


@dataclass(frozen=True)
class TokenTable:
    """Per-row token ids, documents, positions, registers and sentences of a store."""

    token_id: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    split: np.ndarray  # per row
    label: np.ndarray  # per row ('' when the corpus has no labels)
    sentence: np.ndarray  # per row; -1 for rows left out of pooling
    sentence_split: np.ndarray  # per sentence
    doc_split: np.ndarray
    doc_label: np.ndarray
    doc_id: np.ndarray  # per document

    @property
    def registers(self) -> list[str]:
        """The register labels present (empty when the corpus is unlabelled)."""
        return sorted({str(label) for label in self.doc_label if label})


def token_table(store: ActivationStore, tokenizer: Any, include_first_position: bool) -> TokenTable:
    """Read the store's tokens and documents and split passages into sentences by their final punctuation."""
    tokens, docs = store.tokens(), store.docs()
    doc = tokens["doc"].to_numpy()
    pos = tokens["pos"].to_numpy()
    doc_split = np.asarray(docs["split"].to_list() if "split" in docs.columns else [""] * docs.height, dtype=object)
    labels = docs["label"].to_list() if "label" in docs.columns else [None] * docs.height
    doc_id = np.asarray(docs["doc_id"].cast(pl.String).to_list(), dtype=object)
    doc_label = np.asarray([label or "" for label in labels], dtype=object)
    token_id = tokens["token_id"].to_numpy()
    eligible = pos > 0 if not include_first_position else np.ones(len(pos), dtype=bool)
    sentence = _sentence_ids(token_id, doc, eligible, _sentence_end_ids(tokenizer, np.unique(token_id)))
    sentence_split = np.empty(int(sentence.max()) + 1 if len(sentence) else 0, dtype=object)
    sentence_split[sentence[eligible]] = doc_split[doc[eligible]]
    return TokenTable(
        token_id, doc, pos, doc_split[doc], doc_label[doc], sentence, sentence_split, doc_split, doc_label, doc_id
    )


def _sentence_end_ids(tokenizer: Any, token_ids: np.ndarray) -> set[int]:
    """Token ids whose text ends a sentence (., ! or ?, possibly followed by quotes or brackets)."""
    return {int(i) for i in token_ids if _SENTENCE_END.search(tokenizer.decode([int(i)]))}


def _sentence_ids(token_id: np.ndarray, doc: np.ndarray, eligible: np.ndarray, ends: set[int]) -> np.ndarray:
    """Number the sentences 0.. over eligible rows: a new one starts at a document or after a sentence end."""
    is_end = np.isin(token_id, list(ends))
    new_doc = np.r_[True, doc[1:] != doc[:-1]]
    starts = new_doc | np.r_[False, is_end[:-1]]
    raw = np.cumsum(starts) - 1
    sentence = np.full(len(token_id), -1, dtype=np.int64)
    sentence[eligible] = np.unique(raw[eligible], return_inverse=True)[1]
    return sentence


def whole_document_sample(
    table: TokenTable, split: str, eligible: np.ndarray, max_states: int, rng: np.random.Generator
) -> np.ndarray:
    """A row mask over whole documents of ``split``, drawn at random until ``max_states`` rows are reached."""
    docs = np.flatnonzero(table.doc_split == split)
    if not len(docs):
        present = sorted({str(s) for s in table.doc_split})
        raise ConfigError(
            f"the store has no documents in split {split!r} (splits present: {present}); "
            "set geometry.split / geometry.fit_split"
        )
    counts = np.bincount(table.doc[eligible], minlength=len(table.doc_split))
    chosen, total = [], 0
    for doc in rng.permutation(docs):
        if chosen and total + counts[doc] > max_states:
            continue
        chosen.append(doc)
        total += counts[doc]
    return eligible & np.isin(table.doc, chosen)


# --------------------------------------------------------------------------------------------------
# One streamed pass over a layer


@dataclass(frozen=True)
class Selection:
    """Which rows each part of a layer's pass uses; every part is bounded by a setting, not by the store."""

    fit: np.ndarray  # row mask: the fitting split's rows, streamed into exact moments
    measured: np.ndarray  # row mask: whole documents of the measured split, at most max_states rows
    probe: np.ndarray  # row mask: whole documents of the fitting split, at most max_states rows
    sentence_slot: np.ndarray  # per row: its pooled fitting sentence (at most max_sentences), else -1
    passage_slot: np.ndarray  # per row: its measured passage, else -1
    passage_docs: np.ndarray  # the document of each passage slot

    @classmethod
    def draw(cls, table: TokenTable, settings: "GeometrySettings") -> "Selection":
        """Draw the samples once (seeded), so that every layer is measured on the same tokens."""
        eligible = table.sentence >= 0
        rng = np.random.default_rng(settings.seed)
        measured = whole_document_sample(table, settings.split, eligible, settings.max_states, rng)
        probe = whole_document_sample(table, settings.fit_split, eligible, settings.max_states, rng)
        fitting = np.flatnonzero(table.sentence_split == settings.fit_split)
        pooled = np.sort(rng.permutation(fitting)[: settings.max_sentences])
        sentence_slot = np.full(len(table.sentence_split), -1, dtype=np.int64)
        sentence_slot[pooled] = np.arange(len(pooled))
        passage_docs, passage_of_row = np.unique(table.doc[measured], return_inverse=True)
        passage_slot = np.full(len(table.doc), -1, dtype=np.int64)
        passage_slot[measured] = passage_of_row
        return cls(
            fit=eligible & (table.split == settings.fit_split),
            measured=measured,
            probe=probe,
            sentence_slot=np.where(eligible, sentence_slot[np.maximum(table.sentence, 0)], -1),
            passage_slot=passage_slot,
            passage_docs=passage_docs,
        )


@dataclass(frozen=True)
class LayerSample:
    """What one pass over a layer gathers."""

    moments: Moments  # of every fitting-split row
    measured: np.ndarray  # states of the measured sample
    measured_rows: np.ndarray
    probe: np.ndarray  # states of the fitting-split probe sample
    probe_rows: np.ndarray
    sentence_means: np.ndarray  # (pooled fitting sentences, d)
    passage_means: np.ndarray  # (measured passages, d)
    norms: np.ndarray  # (n_tokens,) the norm of every row of the store


def _pooled_means(slots: np.ndarray, count: int, d: int) -> tuple[torch.Tensor, np.ndarray]:
    """Zeroed float64 sums for ``count`` pooled groups and the number of rows each will receive."""
    return torch.zeros(count, d, dtype=torch.float64), np.bincount(slots[slots >= 0], minlength=count)


def _add_pooled(sums: torch.Tensor, slots: np.ndarray, block: np.ndarray) -> None:
    keep = slots >= 0
    sums.index_add_(0, torch.from_numpy(slots[keep]), torch.from_numpy(block[keep]))


def read_layer(store: ActivationStore, layer: int, selection: Selection) -> LayerSample:
    """Stream a layer block by block into the fitting moments, the samples and the pooled states."""
    d = store.d_model
    accumulator = MomentAccumulator(d)
    sentence_sums, sentence_counts = _pooled_means(selection.sentence_slot, int(selection.sentence_slot.max()) + 1, d)
    passage_sums, passage_counts = _pooled_means(selection.passage_slot, len(selection.passage_docs), d)
    measured, probe, norms = [], [], []
    buffer = np.empty((_BLOCK_ROWS, d), dtype=store.stored_dtype(layer))
    for start in range(0, store.n_tokens, _BLOCK_ROWS):
        rows = slice(start, min(start + _BLOCK_ROWS, store.n_tokens))
        block = store.read_into(layer, start, buffer[: rows.stop - start]).astype(np.float64)
        if not np.isfinite(block).all():
            raise StoreError(
                f"{store.path}: resid.{layer:02d} holds non-finite values (rows {start}..{rows.stop - 1}); a float16 "
                "store overflowed? Rebuild it with this model's `store_dtype: float32` under `models`"
            )
        norms.append(np.linalg.norm(block, axis=1))
        accumulator.add(block[selection.fit[rows]])
        measured.append(block[selection.measured[rows]])
        probe.append(block[selection.probe[rows]])
        _add_pooled(sentence_sums, selection.sentence_slot[rows], block)
        _add_pooled(passage_sums, selection.passage_slot[rows], block)
    return LayerSample(
        moments=accumulator.moments(),
        measured=np.concatenate(measured),
        measured_rows=np.flatnonzero(selection.measured),
        probe=np.concatenate(probe),
        probe_rows=np.flatnonzero(selection.probe),
        sentence_means=sentence_sums.numpy() / np.maximum(sentence_counts, 1)[:, None],
        passage_means=passage_sums.numpy() / np.maximum(passage_counts, 1)[:, None],
        norms=np.concatenate(norms),
    )


# --------------------------------------------------------------------------------------------------
# Metrics of one set of token states


def word_occurrences(
    token_id: np.ndarray, groups: np.ndarray, settings: GeometrySettings, rng: np.random.Generator
) -> list[np.ndarray]:
    """Row indices of the occurrences of up to ``words`` word types seen in ≥ ``min_occurrences`` passages.

    One occurrence per passage (its first), at most ``max_occurrences`` per word, words drawn at random.
    """
    first = np.unique(np.stack([token_id, groups], 1), axis=0, return_index=True)[1]
    first.sort()
    types, counts = np.unique(token_id[first], return_counts=True)
    frequent = types[counts >= settings.min_occurrences]
    chosen = rng.permutation(frequent)[: settings.words]
    occurrences = []
    for word in chosen:
        rows = first[token_id[first] == word]
        occurrences.append(rng.permutation(rows)[: settings.max_occurrences])
    return occurrences


def pair_anisotropy(states: np.ndarray, groups: np.ndarray, settings: GeometrySettings, seed: int) -> Anisotropy:
    """Mean cosine and per-dimension shares over ``settings.pairs`` seeded pairs from different passages."""
    return anisotropy(states, random_pairs(groups, settings.pairs, seed=seed))


def space_metrics(
    states: np.ndarray,
    groups: np.ndarray,
    token_id: np.ndarray,
    settings: GeometrySettings,
    seed: int,
    aniso: Anisotropy | None = None,
) -> dict[str, float]:
    """The token-level metrics of one set of states (rows grouped by passage) that are not spectrum-based.

    ``aniso`` if already computed. The spectrum-based ones are :func:`spectrum_rows`; intra-sentence
    similarity is :func:`sentence_rows` (it needs whole sentences).
    """
    rng = np.random.default_rng(seed)
    if aniso is None:
        aniso = pair_anisotropy(states, groups, settings, seed)
    norms = np.linalg.norm(states, axis=1)
    twonn_rows = rng.permutation(len(states))[: settings.twonn_states]
    metrics = {
        "mean_cosine": aniso.mean_cosine,
        "cosine_top3_share": aniso.top_share(3),
        "euclidean_top3_share": float(np.sort(aniso.euclidean_share)[::-1][:3].sum()),
        "twonn": twonn(states[twonn_rows]),
        "norm_mean": float(norms.mean()),
        "norm_cv": float(norms.std() / max(norms.mean(), 1e-12)),
    }
    metrics.update(_word_metrics(states, groups, token_id, settings, rng, aniso.mean_cosine))
    return metrics


def spectrum_rows(
    states: np.ndarray,
    groups: np.ndarray,
    massive: np.ndarray,
    settings: GeometrySettings,
    seed: int,
    bootstrap: bool,
) -> list[dict[str, Any]]:
    """IsoScore and effective rank without the ``massive`` rows and with them, each with n, documents and power.

    ``states`` ``(n, d)``; ``groups`` (documents) and ``massive`` ``(n,)``. The value without the massive rows
    gets a document-bootstrap interval when ``bootstrap``; the one with them is named ``*_with_massive``.
    """
    rows = []
    d = states.shape[1]
    without = spectrum_metrics(pca_variances(states[~massive]))
    variants = [("", ~massive, "removed", without)]
    variants.append(
        (
            WITH_MASSIVE,
            np.ones(len(states), bool),
            "kept",
            spectrum_metrics(pca_variances(states)) if massive.any() else without,
        )
    )
    for suffix, keep, label, values in variants:
        intervals = {}
        if bootstrap and label == "removed" and settings.bootstrap:
            intervals = cluster_bootstrap(states[keep], groups[keep], settings.bootstrap, settings.confidence, seed)
        n = int(keep.sum())
        for metric, value in values.items():
            low, high = (None if np.isnan(bound) else bound for bound in intervals.get(metric, (np.nan, np.nan)))
            rows.append(
                {
                    "metric": metric + suffix,
                    "value": value,
                    "n": n,
                    "documents": int(np.unique(groups[keep]).size),
                    "powered": is_powered(n, d, settings.power_ratio),
                    "ci_low": low,
                    "ci_high": high,
                    "massive_tokens": label,
                }
            )
    return rows


def sentence_rows(states: np.ndarray, sentences: np.ndarray, baseline_cosine: float) -> list[dict[str, Any]]:
    """Ethayarajh's intra-sentence similarity, per sentence and averaged, raw and minus the anisotropy baseline.

    ``n`` is the number of sentences (of at least two tokens) averaged.
    """
    value, count = mean_intra_sentence_similarity(states, sentences)
    if not count:
        return []
    return [
        {"metric": "intra_similarity", "value": value, "n": count},
        {"metric": "intra_similarity_adjusted", "value": value - baseline_cosine, "n": count},
    ]


def _word_metrics(
    states: np.ndarray,
    groups: np.ndarray,
    token_id: np.ndarray,
    settings: GeometrySettings,
    rng: np.random.Generator,
    baseline_cosine: float,
) -> dict[str, float]:
    """Ethayarajh's self-similarity and MEV over words in several contexts, raw and baseline-adjusted."""
    occurrences = word_occurrences(token_id, groups, settings, rng)
    if not occurrences:
        return {}
    self_sim = np.mean([self_similarity(states[rows]) for rows in occurrences])
    mev = np.mean([maximum_explainable_variance(states[rows]) for rows in occurrences])
    random_rows = [rng.choice(len(states), len(rows), replace=False) for rows in occurrences]
    random_mev = np.mean([maximum_explainable_variance(states[rows]) for rows in random_rows])
    return {
        "self_similarity": float(self_sim),
        "self_similarity_adjusted": float(self_sim - baseline_cosine),
        "mev": float(mev),
        "mev_adjusted": float(mev - random_mev),
        "words": float(len(occurrences)),
    }


# --------------------------------------------------------------------------------------------------
# Passage level and probes


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (Mann–Whitney, ties halved)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rank_average(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def register_auc(vectors: np.ndarray, labels: np.ndarray) -> float:
    """How well cosine similarity separates same-label from different-label pairs (all pairs i < j)."""
    units = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    i, j = np.triu_indices(len(vectors), k=1)
    return roc_auc((units @ units.T)[i, j], labels[i] == labels[j])


def probe_accuracy(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, l2: float, steps: int = 100
) -> float:
    """Held-out accuracy of a multinomial logistic probe on standardised features (L-BFGS, L2 penalty)."""
    mean, std = train.mean(0), np.maximum(train.std(0), 1e-8)
    x, x_test = torch.from_numpy((train - mean) / std), torch.from_numpy((test - mean) / std)
    classes = np.unique(train_labels)
    y = torch.from_numpy(np.searchsorted(classes, train_labels))
    weights = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = functional.cross_entropy(x @ weights + bias, y) + l2 * weights.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        predicted = classes[(x_test @ weights + bias).argmax(1).numpy()]
    return float((predicted == test_labels).mean())


def probe_metrics(
    sample: LayerSample, table: TokenTable, settings: GeometrySettings, rng: np.random.Generator
) -> dict[str, float]:
    """Mickus et al.'s confound: can position bucket (no semantic content) and register be read off linearly?"""
    targets = {"position": np.searchsorted(settings.position_buckets, table.pos, side="right") - 1}
    if table.registers:
        targets["register"] = table.label
    metrics = {}
    for name, labels in targets.items():
        train_labels, test_labels = labels[sample.probe_rows], labels[sample.measured_rows]
        if len(np.unique(train_labels)) < 2:
            continue
        accuracy = probe_accuracy(
            sample.probe, train_labels, sample.measured, test_labels, settings.probe_l2, settings.probe_steps
        )
        shuffled = probe_accuracy(
            sample.probe,
            rng.permutation(train_labels),
            sample.measured,
            test_labels,
            settings.probe_l2,
            settings.probe_steps,
        )
        values, counts = np.unique(train_labels, return_counts=True)
        metrics[f"{name}_probe_accuracy"] = accuracy
        metrics[f"{name}_probe_shuffled"] = shuffled
        metrics[f"{name}_probe_majority"] = float((test_labels == values[np.argmax(counts)]).mean())
    return metrics


# --------------------------------------------------------------------------------------------------
# A whole store


def fit_processings(
    moments: Moments, sentences: np.ndarray, settings: GeometrySettings, d: int, seed: int
) -> tuple[dict[str, Transform], dict[str, Transform], FittedFlow | None]:
    """Fit the token-level and the passage-level transforms.

    Token-level affine maps come from the streamed token moments; passage-level ones from pooled sentence
    states. The flow is fitted once, on sentences, and serves both levels.
    """
    top = settings.all_but_the_top or max(1, d // 100)
    sentence_moments = Moments.of(sentences)
    tokens: dict[str, Transform] = {}
    passages: dict[str, Transform] = {}
    flow = None
    for name in settings.processings:
        if name == "flow":
            flow = fit_flow(sentences, settings.flow, seed=seed)
            tokens[name] = passages[name] = flow
        else:
            tokens[name] = post_processing_from_moments(moments, name, top)
            passages[name] = post_processing_from_moments(sentence_moments, name, top)
    return tokens, passages, flow


def measure_layer(
    store: ActivationStore,
    layer: int,
    table: TokenTable,
    selection: Selection,
    settings: GeometrySettings,
    draws: np.ndarray | None = None,
    replicates: dict[tuple[int, str, str], np.ndarray] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Metric rows, rogue-dimension rows, flow-loss rows and massive-token rows (token text not yet decoded).

    With ``draws`` (:func:`document_draws` over ``selection.passage_docs``) the mean cosine, the top-3
    cosine share (raw and standardised) and the passage register AUC of all registers get percentile
    intervals over documents; their replicates are kept in ``replicates`` under (layer, processing, metric)
    for the paired changes :func:`change_rows` computes.
    """
    sample = read_layer(store, layer, selection)
    seed = settings.seed * 1000 + layer
    fit_sentences = sample.sentence_means
    tokens, passages, flow = fit_processings(sample.moments, fit_sentences, settings, store.d_model, seed)
    rows = sample.measured_rows
    groups, token_id, labels = table.doc[rows], table.token_id[rows], table.label[rows]
    sentences = table.sentence[rows]
    massive = massive_rows(sample.norms, table.sentence >= 0, settings.massive_multiple)
    massive_measured = massive[rows]
    metric_rows: list[dict[str, Any]] = []
    rogue_rows: list[dict[str, Any]] = []

    def add(register: str, processing: str, values: Mapping[str, float], n: int) -> None:
        extend(register, processing, [{"metric": k, "value": v, "n": n} for k, v in values.items()])

    def extend(register: str, processing: str, partial: list[dict[str, Any]]) -> None:
        base = {"layer": layer, "register": register, "processing": processing, "massive_tokens": "kept"}
        metric_rows.extend({key: None for key in METRIC_SCHEMA} | base | row for row in partial)

    equal_size = _register_sizes(labels, table.registers, settings.register_states)
    kept = replicates if replicates is not None else {}
    for name, transform in tokens.items():
        states = transform(sample.measured)
        pairs = random_pairs(groups, settings.pairs, seed=seed)
        aniso = anisotropy(states, pairs)
        bootstrap = name in settings.bootstrap_processings
        add(ALL_REGISTERS, name, space_metrics(states, groups, token_id, settings, seed, aniso), len(states))
        if draws is not None:
            for metric, values in _pair_replicates(states, pairs, groups, selection, draws, name).items():
                kept[(layer, name, metric)] = values
                _set_interval(metric_rows[-1::-1], name, metric, values, settings.confidence, draws.shape[1])
        extend(ALL_REGISTERS, name, spectrum_rows(states, groups, massive_measured, settings, seed, bootstrap))
        extend(ALL_REGISTERS, name, sentence_rows(states, sentences, aniso.mean_cosine))
        if name in ("none", "standardise"):
            rogue_rows.extend(_rogue_rows(layer, name, aniso))
        if name not in settings.register_processings:
            continue
        rng = np.random.default_rng(seed)
        for register in table.registers:
            subset = _register_subset(labels, register, equal_size, rng)
            if np.unique(groups[subset]).size < 2:
                log.warning(
                    "resid.%02d: register %s has under two measured passages; raise geometry.max_states",
                    layer,
                    register,
                )
                continue
            values = space_metrics(states[subset], groups[subset], token_id[subset], settings, seed)
            add(register, name, values, int(subset.sum()))
            spectrum = spectrum_rows(
                states[subset], groups[subset], massive_measured[subset], settings, seed, bootstrap
            )
            extend(register, name, spectrum)
            # IntraSim is a mean over sentences, not biased by their number: every measured sentence of the register
            whole = labels == register
            extend(register, name, sentence_rows(states[whole], sentences[whole], values["mean_cosine"]))
    for name, transform in passages.items():
        vectors = transform(sample.passage_means)
        pairs = random_pairs(np.arange(len(vectors)), settings.pairs, seed=seed)
        values = {"passage_mean_cosine": anisotropy(vectors, pairs).mean_cosine}
        if table.registers:
            values["passage_register_auc"] = register_auc(vectors, table.doc_label[selection.passage_docs])
        add(ALL_REGISTERS, name, values, len(vectors))
        if table.registers and draws is not None:
            auc = passage_auc_replicates(vectors, table.doc_label[selection.passage_docs], draws)
            kept[(layer, name, "passage_register_auc")] = auc
            _set_interval(metric_rows[-1::-1], name, "passage_register_auc", auc, settings.confidence, len(vectors))
    add(ALL_REGISTERS, "none", probe_metrics(sample, table, settings, np.random.default_rng(seed)), len(rows))
    flow_rows = [
        {
            "layer": layer,
            "epoch": epoch,
            "loss": flow.losses[epoch - 1] if epoch else float("nan"),  # epoch 0: whitening alone, untrained
            "validation_loss": held,
            "kept": epoch == flow.best_epoch,
            "sentences": len(fit_sentences),
        }
        for epoch, held in enumerate(flow.validation_losses if flow else [])
    ]
    return metric_rows, rogue_rows, flow_rows, _massive_rows(layer, sample.norms, massive, table, selection)


def _massive_rows(
    layer: int, norms: np.ndarray, massive: np.ndarray, table: TokenTable, selection: Selection
) -> list[dict[str, Any]]:
    """One row per massive token of a layer (all splits): where it is, how long its state is, if it was measured."""
    median = float(np.median(norms[table.sentence >= 0]))
    return [
        {
            "layer": layer,
            "doc_id": str(table.doc_id[table.doc[row]]),
            "split": str(table.split[row]),
            "register": str(table.label[row]),
            "position": int(table.pos[row]),
            "token_id": int(table.token_id[row]),
            "norm": float(norms[row]),
            "median_norm": median,
            "ratio": float(norms[row] / median),
            "measured": bool(selection.measured[row]),
        }
        for row in np.flatnonzero(massive)
    ]


def _log_massive(layer: int, rows: list[dict[str, Any]], multiple: float) -> None:
    """A log line per layer: how many massive tokens, and the longest few with their document and position."""
    if not rows:
        log.info("resid.%02d: no token's norm exceeds %g x the median", layer, multiple)
        return
    longest = sorted(rows, key=lambda row: -row["ratio"])[:5]
    described = "; ".join(
        f"{row['token']!r} doc {row['doc_id']} pos {row['position']} ({row['split']}) {row['ratio']:.1f}x"
        for row in longest
    )
    measured = sum(row["measured"] for row in rows)
    log.info(
        "resid.%02d: %d massive token(s) (norm > %g x the median %.1f), %d in the measured sample: %s",
        layer,
        len(rows),
        multiple,
        rows[0]["median_norm"],
        measured,
        described,
    )


def _register_sizes(labels: np.ndarray, registers: Sequence[str], cap: int) -> int:
    """One sample size for every register (the smallest register's count, at most ``cap``): fair comparisons."""
    counts = [int((labels == register).sum()) for register in registers]
    return min([cap, *counts]) if counts else 0


def _register_subset(labels: np.ndarray, register: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of ``size`` random rows of one register."""
    rows = np.flatnonzero(labels == register)
    mask = np.zeros(len(labels), dtype=bool)
    mask[rng.permutation(rows)[:size]] = True
    return mask


def _rogue_rows(layer: int, processing: str, aniso: Anisotropy) -> list[dict[str, Any]]:
    """The ten dimensions with the largest share of the mean cosine and of squared Euclidean distance.

    A cosine share is CC_i / Σ_j |CC_j| (Timkey & van Schijndel's CC_i / Â when every contribution is
    positive, and still defined after centring, where Â ≈ 0); dimensions are ranked by its magnitude.
    """
    rows = []
    for kind, share, total in (
        ("cosine", aniso.cosine_share, float(np.abs(aniso.cosine_share).sum())),
        ("euclidean", aniso.euclidean_share, 1.0),
    ):
        for rank, dimension in enumerate(np.argsort(np.abs(share))[::-1][:10], start=1):
            rows.append(
                {
                    "layer": layer,
                    "processing": processing,
                    "kind": kind,
                    "rank": rank,
                    "dimension": int(dimension),
                    "share": float(share[dimension] / total) if total else float("nan"),
                }
            )
    return rows


def _pair_replicates(
    states: np.ndarray, pairs: np.ndarray, groups: np.ndarray, selection: Selection, draws: np.ndarray, name: str
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of the mean cosine (and, raw and standardised, the top-3 cosine share)."""
    positions = np.searchsorted(selection.passage_docs, groups)
    weights = pair_weights(draws, positions[pairs[:, 0]], positions[pairs[:, 1]])
    contributions = cosine_contributions(states[pairs[:, 0]], states[pairs[:, 1]])
    result = {"mean_cosine": pair_means(contributions.sum(1), weights)}
    if name in SHARE_PROCESSINGS:
        result["cosine_top3_share"] = top_shares(pair_means(contributions, weights), 3)
    return result


def passage_auc_replicates(vectors: np.ndarray, labels: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Bootstrap replicates of :func:`register_auc`: passage pairs weighted by their documents' draw counts."""
    units = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    i, j = np.triu_indices(len(vectors), k=1)
    return weighted_auc((units @ units.T)[i, j], labels[i] == labels[j], pair_weights(draws, i, j))


def _set_interval(
    rows: Sequence[dict[str, Any]], processing: str, metric: str, values: np.ndarray, confidence: float, n: int
) -> None:
    """Put the percentile interval of ``values`` on the first row of ``rows`` measuring ``metric``."""
    row = next(row for row in rows if row["metric"] == metric and row["processing"] == processing)
    interval = percentile_interval(row["value"], values, n=n, unit="document", confidence=confidence)
    row.update(ci_low=interval.low, ci_high=interval.high, documents=interval.n, unit=interval.unit)


def change_rows(
    replicates: Mapping[tuple[int, str, str], np.ndarray],
    estimates: pl.DataFrame,
    confidence: float,
    n_documents: int,
) -> list[dict[str, Any]]:
    """Paired changes with percentile intervals over the same document draws.

    ``mean_cosine_change``: the mean cosine of a layer minus that of the first measured layer (the embedding
    layer when layer 0 is measured), per token processing. ``passage_register_auc_change``: the register AUC
    after a post-processing minus the raw one, per layer. ``estimates`` is the metric table (all registers).
    """

    def estimate(layer: int, processing: str, metric: str) -> float:
        found = estimates.filter(
            (pl.col("layer") == layer) & (pl.col("processing") == processing) & (pl.col("metric") == metric)
            & (pl.col("register") == ALL_REGISTERS)
        )  # fmt: skip
        return float(found["value"][0])

    rows = []
    layers = sorted({layer for layer, _, _ in replicates})
    for (layer, processing, metric), values in replicates.items():
        if metric == "mean_cosine" and layer != layers[0] and (layers[0], processing, metric) in replicates:
            base, change = layers[0], "mean_cosine_change"
            reference = replicates[(base, processing, metric)]
            value = estimate(layer, processing, metric) - estimate(base, processing, metric)
        elif metric == "passage_register_auc" and processing != "none" and (layer, "none", metric) in replicates:
            change, reference = "passage_register_auc_change", replicates[(layer, "none", metric)]
            value = estimate(layer, processing, metric) - estimate(layer, "none", metric)
        else:
            continue
        interval = percentile_interval(value, values - reference, n=n_documents, unit="document", confidence=confidence)
        rows.append(
            {key: None for key in METRIC_SCHEMA}
            | {"layer": layer, "register": ALL_REGISTERS, "processing": processing, "metric": change,
               "value": value, "n": n_documents, "documents": n_documents, "ci_low": interval.low,
               "ci_high": interval.high, "massive_tokens": "kept", "unit": interval.unit}
        )  # fmt: skip
    return rows


def measure_geometry(store: ActivationStore, tokenizer: Any, settings: GeometrySettings) -> GeometryResult:
    """Measure every selected layer of a store; see the module docstring for what is measured where."""
    n_layers = int(store.attrs["n_layers"])
    layers = select_layers(settings.layers, n_layers)
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        raise ConfigError(
            f"geometry.layers selects {missing}, not stored in {store.path} (stored: {store.layers}); "
            "extract them (extraction.layers) or choose stored ones"
        )
    table = token_table(store, tokenizer, settings.include_first_position)
    selection = Selection.draw(table, settings)
    if len(selection.passage_docs) < 2:
        raise ConfigError(
            f"the measured sample holds {len(selection.passage_docs)} document(s) of split {settings.split!r}; "
            "raise geometry.max_states (or use a split with more documents)"
        )
    metric_rows, rogue_rows, flow_rows, massive_rows_ = [], [], [], []
    n_documents = len(selection.passage_docs)
    draws = document_draws(n_documents, PAIR_REPLICATES, settings.seed)
    replicates: dict[tuple[int, str, str], np.ndarray] = {}
    for layer in layers:
        metrics, rogue, flow, massive = measure_layer(store, layer, table, selection, settings, draws, replicates)
        for row in massive:
            row["token"] = tokenizer.decode([row["token_id"]])
        _log_massive(layer, massive, settings.massive_multiple)
        metric_rows += metrics
        rogue_rows += rogue
        flow_rows += flow
        massive_rows_ += massive
    estimates = pl.DataFrame(metric_rows, schema=METRIC_SCHEMA)
    metric_rows += change_rows(replicates, estimates, settings.confidence, n_documents)
    depth = pl.col("layer") / n_layers
    return GeometryResult(
        metrics=pl.DataFrame(metric_rows, schema=METRIC_SCHEMA).with_columns(relative_depth=depth),
        rogue=pl.DataFrame(rogue_rows).with_columns(relative_depth=depth),
        flow_losses=pl.DataFrame(
            flow_rows,
            schema={
                "layer": pl.Int64,
                "epoch": pl.Int64,
                "loss": pl.Float64,
                "validation_loss": pl.Float64,
                "kept": pl.Boolean,
                "sentences": pl.Int64,
            },
        ),
        massive=pl.DataFrame(massive_rows_, schema=MASSIVE_SCHEMA).with_columns(relative_depth=depth),
    )
