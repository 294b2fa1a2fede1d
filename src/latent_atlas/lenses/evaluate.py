"""Per-layer evaluation of lenses on stored states (METHODS §1 metrics), in long format.

For each lens and layer, over held-out tokens: KL(p_final || p_lens) in nats, cross-entropy to the next
token, entropy of p_lens, top-1 agreement with the model's final prediction (Ghandeharioun et al.'s
Precision@1 when the reader is a patchscope), surprisal -log p_final(argmax p_lens) (their surprisal: the
reader's top-1 scored under the model's own distribution, in nats), the rank of the final top-1 token under
the lens (median; 0 = top), and top-1 agreement with the logit lens.

Uncertainty. Tokens of one document are not independent, so the unit of every interval is the document: the
evaluation keeps each metric's per-document sums and counts (:func:`evaluate_lenses_by_document`), the curves
carry a 95 % percentile bootstrap over documents (``ci_low``, ``ci_high``, ``n`` documents, ``unit``), and
comparisons of two lenses are paired on the same tokens of the same documents (:func:`paired_lens_difference`).
The median rank has no interval (NaN).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from latent_atlas.addresses import resid_address
from latent_atlas.errors import ConfigError
from latent_atlas.lenses.base import Lens, Unembed
from latent_atlas.lenses.streaming import DEFAULT_WIDTH, Blocks, KeptBlocks, Reference, RowStats, row_stats
from latent_atlas.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_REPLICATES,
    MIN_UNITS,
    Interval,
    bootstrap_mean,
    percentile_interval,
)
from latent_atlas.store import ActivationStore

UNIT = "document"
DOCUMENT_SCHEMA = {
    "lens": pl.String,
    "layer": pl.Int64,
    "metric": pl.String,
    "doc": pl.Int64,
    "sum": pl.Float64,
    "count": pl.Int64,
}


@dataclass(frozen=True)
class EvaluationTokens:
    """Store rows to evaluate on, with the next token of each (-1 where the document ends) and its document."""

    rows: np.ndarray
    next_ids: np.ndarray
    docs: np.ndarray | None = None  # the store's document index of each row (None: every token its own unit)


def evaluation_tokens(
    store: ActivationStore, split: str, max_tokens: int | None, skip_first_position: bool, seed: int = 0
) -> EvaluationTokens:
    """Pick rows of one split (optionally without position 0), at most ``max_tokens``, sorted."""
    tokens = store.tokens()
    docs = store.docs().with_row_index("doc").with_columns(pl.col("doc").cast(pl.Int32))
    table = tokens.join(docs.select("doc", "split"), on="doc", how="left")
    following = table["token_id"].shift(-1)
    same_doc = (table["doc"].shift(-1) == table["doc"]) & (table["pos"].shift(-1) == table["pos"] + 1)
    table = table.with_columns(next_id=pl.when(same_doc).then(following).otherwise(-1))
    chosen = table.filter(pl.col("split") == split)
    if skip_first_position:
        chosen = chosen.filter(pl.col("pos") > 0)
    if chosen.height == 0:
        raise ConfigError(f"no stored tokens in split '{split}'; check lenses.split and extraction.splits")
    rows = chosen["row"].to_numpy()
    next_ids = chosen["next_id"].fill_null(-1).to_numpy()
    docs = chosen["doc"].to_numpy().astype(np.int64)
    if max_tokens and len(rows) > max_tokens:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_tokens, replace=False))
        rows, next_ids, docs = rows[pick], next_ids[pick], docs[pick]
    return EvaluationTokens(rows, next_ids, docs)


@torch.no_grad()
def evaluate_lenses_by_document(
    store: ActivationStore,
    unembed: Unembed,
    lenses: Mapping[str, Lens],
    layers: Sequence[int],
    tokens: EvaluationTokens,
    chunk_size: int = 512,
    vocab_block: int = DEFAULT_WIDTH,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every lens at every layer, kept per document: (sums, ranks).

    ``sums``: one row per (lens, layer, metric, doc) with the metric's ``sum`` over that document's evaluated
    tokens and their ``count``. ``ranks``: one row per (lens, layer) with the final top-1 token's rank under the
    lens at every token (a list), for the median. Tokens are taken ``chunk_size`` at a time, and each lens's
    logits ``vocab_block`` vocabulary columns at a time (:mod:`latent_atlas.lenses.streaming`).
    """
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        raise ConfigError(
            f"lenses.layers asks for layers {missing}, which the store does not hold (stored: {store.layers}); "
            "add them to extraction.layers or drop them from lenses.layers"
        )
    docs = tokens.docs if tokens.docs is not None else np.arange(len(tokens.rows))
    doc_ids, doc_index = np.unique(docs, return_inverse=True)
    sums: dict[tuple[str, int, str], np.ndarray] = {}
    counts: dict[tuple[str, int, str], np.ndarray] = {}
    ranks: dict[tuple[str, int], list[np.ndarray]] = {}
    logit_lens = lenses.get("logit")
    for start in range(0, len(tokens.rows), chunk_size):
        rows = tokens.rows[start : start + chunk_size]
        chunk_docs = doc_index[start : start + chunk_size]
        next_ids = torch.from_numpy(tokens.next_ids[start : start + chunk_size]).long()
        final = FinalDistribution.of(unembed, torch.from_numpy(store.read("ln_final", rows)), vocab_block)
        for layer in layers:
            states = torch.from_numpy(store.read(layer, rows))
            logit = (
                _token_metrics(Blocks.of(logit_lens, states, layer, vocab_block), final, next_ids)
                if logit_lens is not None
                else None
            )
            for name, lens in lenses.items():
                if not lens.reads(layer):
                    continue
                metrics, top1 = (
                    logit
                    if lens is logit_lens
                    else _token_metrics(Blocks.of(lens, states, layer, vocab_block), final, next_ids)
                )
                if logit is not None:
                    metrics = metrics | {"agreement_with_logit": _agreement(top1, logit[1])}
                for metric, (values, scored) in metrics.items():
                    if metric == "final_top1_rank":
                        ranks.setdefault((name, layer), []).append(values)
                        continue
                    key = (name, layer, metric)
                    where = chunk_docs[scored]
                    sums[key] = sums.get(key, 0.0) + np.bincount(where, values, minlength=len(doc_ids))
                    counts[key] = counts.get(key, 0) + np.bincount(where, minlength=len(doc_ids))
    records = [
        {"lens": name, "layer": layer, "metric": metric, "doc": int(doc_ids[d]), "sum": float(total[d]),
         "count": int(counts[key][d])}
        for key, total in sums.items()
        for name, layer, metric in [key]
        for d in np.flatnonzero(counts[key])
    ]  # fmt: skip
    rank_rows = [
        {"lens": name, "layer": layer, "ranks": np.concatenate(parts)} for (name, layer), parts in ranks.items()
    ]
    return pl.DataFrame(records, schema=DOCUMENT_SCHEMA), pl.DataFrame(rank_rows)


def curves_from_documents(
    documents: pl.DataFrame, ranks: pl.DataFrame | None = None, replicates: int = DEFAULT_REPLICATES, seed: int = 0
) -> pl.DataFrame:
    """The per-layer curves: the mean of each metric over tokens and its bootstrap interval over documents.

    Columns ``lens, address, layer, metric, value, n_tokens, ci_low, ci_high, n, unit``. Every (lens, layer,
    metric) is resampled with the same seed, so curves measured on the same documents draw the same ones.
    """
    records = []
    for (name, layer, metric), group in documents.group_by("lens", "layer", "metric", maintain_order=True):
        interval = document_mean(group, replicates, seed)
        records.append(_record(name, layer, metric, interval.estimate, int(group["count"].sum())) | interval.columns())
    for name, layer, values in ranks.iter_rows() if ranks is not None and ranks.height else ():
        interval = {"ci_low": float("nan"), "ci_high": float("nan"), "n": len(values), "unit": "token (median)"}
        records.append(_record(name, layer, "final_top1_rank", float(np.median(values)), len(values)) | interval)
    return pl.DataFrame(records).sort("lens", "layer", "metric")


def document_mean(group: pl.DataFrame, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> Interval:
    """The token mean of per-document ``sum``/``count`` rows, bootstrapped over documents (weighted by count).

    Each document's tokens are represented by ``count`` copies of its mean, which gives :func:`bootstrap_mean`
    exactly the document's sum and count.
    """
    counts = group["count"].to_numpy()
    means = group["sum"].to_numpy() / np.maximum(counts, 1)
    return bootstrap_mean(
        np.repeat(means, counts), np.repeat(group["doc"].to_numpy(), counts), unit=UNIT, replicates=replicates,
        seed=seed,
    )  # fmt: skip


def paired_lens_difference(
    documents: pl.DataFrame,
    metric: str,
    lens: str,
    baseline: str,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> pl.DataFrame:
    """Per layer read by both: mean over tokens of ``metric(lens) − metric(baseline)``, paired on documents.

    Both lenses are evaluated on the same tokens, so a document's difference is the difference of its sums.
    Columns ``layer, value, ci_low, ci_high, n, unit``; plus one row ``layer = -1`` for the maximum over
    layers of the difference, bootstrapped with the same document draws at every layer.
    """
    differences = _paired_documents(documents, metric, lens, baseline)
    records = []
    for (layer,), group in differences.group_by("layer", maintain_order=True):
        interval = document_mean(group, replicates, seed)
        records.append({"layer": layer, "value": interval.estimate, **interval.columns()})
    if records:
        records.append({"layer": -1, **max_over_layers(differences, replicates, seed)})
    schema = {"layer": pl.Int64, "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "n": pl.Int64,
              "unit": pl.String}  # fmt: skip
    return pl.DataFrame(records, schema=schema).sort("layer")


def _paired_documents(documents: pl.DataFrame, metric: str, lens: str, baseline: str) -> pl.DataFrame:
    """Per (layer, doc): the difference of the two lenses' sums over the same tokens, and their count."""
    rows = documents.filter(pl.col("metric") == metric)
    left = rows.filter(pl.col("lens") == lens).select("layer", "doc", "sum", "count")
    right = rows.filter(pl.col("lens") == baseline).select("layer", "doc", pl.col("sum").alias("base"),
                                                           pl.col("count").alias("base_count"))  # fmt: skip
    joined = left.join(right, on=["layer", "doc"], how="inner").sort("layer", "doc")
    if (joined["count"] != joined["base_count"]).any():
        raise ValueError(f"lenses {lens!r} and {baseline!r} were not evaluated on the same tokens")
    return joined.select("layer", "doc", (pl.col("sum") - pl.col("base")).alias("sum"), "count")


def max_over_layers(differences: pl.DataFrame, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> dict:
    """The largest per-layer mean difference and its percentile interval over the same document draws."""
    layers = differences["layer"].unique(maintain_order=True).to_list()
    doc_ids = np.unique(differences["doc"].to_numpy())
    sums, counts = np.zeros((len(layers), len(doc_ids))), np.zeros((len(layers), len(doc_ids)))
    for row, layer in enumerate(layers):
        part = differences.filter(pl.col("layer") == layer)
        columns = np.searchsorted(doc_ids, part["doc"].to_numpy())
        sums[row, columns], counts[row, columns] = part["sum"].to_numpy(), part["count"].to_numpy()
    estimate = float((sums.sum(1) / counts.sum(1)).max())
    n = len(doc_ids)
    replicate_max = np.empty(0)
    if n >= MIN_UNITS:
        draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
        replicate_max = ((draws @ sums.T) / (draws @ counts.T)).max(1)
    interval = percentile_interval(estimate, replicate_max, n=n, unit=UNIT, confidence=DEFAULT_CONFIDENCE)
    return {"value": interval.estimate, **interval.columns()}


def evaluate_lenses(
    store: ActivationStore,
    unembed: Unembed,
    lenses: Mapping[str, Lens],
    layers: Sequence[int],
    tokens: EvaluationTokens,
    chunk_size: int = 512,
    vocab_block: int = DEFAULT_WIDTH,
) -> pl.DataFrame:
    """Evaluate every lens at every layer; returns one row per (lens, layer, metric) (:func:`curves_from_documents`)."""
    documents, ranks = evaluate_lenses_by_document(store, unembed, lenses, layers, tokens, chunk_size, vocab_block)
    return curves_from_documents(documents, ranks)


def _record(lens: str, layer: int, metric: str, value: float, n_tokens: int) -> dict[str, object]:
    """One row of the long-format table."""
    address = resid_address(layer)
    return {"lens": lens, "address": address, "layer": layer, "metric": metric, "value": value, "n_tokens": n_tokens}


def _token_metrics(
    blocks: Blocks, final: "FinalDistribution", next_ids: torch.Tensor
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], torch.Tensor]:
    """Per-token values of each metric over one chunk (with the mask of the tokens they belong to), and the top-1.

    One streamed log-sum-exp per row serves every metric (:func:`~latent_atlas.lenses.streaming.row_stats`): with
    ``m`` the row's largest logit, ``s = z - m`` and ``L = log sum exp s``, ``log p = s - L``, so CE is
    ``L - s[next]``, the entropy ``L - E_p[s]``, KL ``-H(p_final) - E_final[s] + L``, and the rank of the final
    top-1 token counts the logits above its own.
    """
    stats = row_stats(blocks, final.reference, next_ids, final.top1)
    entropy = stats.log_total - stats.weighted / stats.total
    kl = final.neg_entropy - (stats.cross - stats.log_total * final.mass)
    has_next = next_ids >= 0
    ce = (stats.log_total - (stats.at_next - stats.top))[has_next]
    surprisal = final.stats.log_total - (final.logits.at(stats.top1) - final.stats.top)
    every = np.ones(blocks.rows, dtype=bool)
    metrics = {
        "kl_to_final": (_values(kl), every),
        "entropy": (_values(entropy), every),
        "top1_agreement": _agreement(stats.top1, final.top1),
        "surprisal": (_values(surprisal), every),
        "ce_next_token": (_values(ce), has_next.numpy()),
        "final_top1_rank": (stats.above.numpy(), every),
    }
    return metrics, stats.top1


def _values(tensor: torch.Tensor) -> np.ndarray:
    """A metric's per-token values as float64."""
    return tensor.double().numpy()


def _agreement(top1: torch.Tensor, other: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Whether two top-1 tokens agree, at every token."""
    return _values(top1 == other), np.ones(len(top1), dtype=bool)


@dataclass(frozen=True)
class FinalDistribution:
    """The model's own next-token distribution for a chunk of tokens, computed once for every lens.

    Its logits are kept in vocabulary blocks; ``stats.cross`` is ``sum p (z - m)`` by the lenses' own arithmetic,
    so a lens whose logits are the model's has KL exactly 0.
    """

    logits: KeptBlocks
    stats: RowStats
    reference: Reference  # the probabilities, block by block
    mass: torch.Tensor  # row sums of the probabilities (1 up to rounding)
    neg_entropy: torch.Tensor

    @property
    def top1(self) -> torch.Tensor:
        """The model's top-1 token at each row (the first on ties)."""
        return self.stats.top1

    @classmethod
    def of(cls, unembed: Unembed, final_states: torch.Tensor, width: int = DEFAULT_WIDTH) -> "FinalDistribution":
        """From post-final-norm states ``(n, d)``: logits through the model's head, then p, sum p log p, arg-max."""
        readout = unembed.readout()
        if readout is None:
            blocks = Blocks(None, logits=unembed.lm_head(final_states).float(), width=width)
        else:
            blocks = Blocks(readout, final_states.float(), width=width)
        return cls.from_blocks(blocks.kept())

    @classmethod
    def from_blocks(cls, logits: KeptBlocks) -> "FinalDistribution":
        """The distribution of kept logits: two passes, the second with p as the reference."""
        first = row_stats(logits)
        shift, total = first.top[:, None], first.total[:, None]
        probs = [torch.sub(block, shift).exp_().div_(total) for _, block in logits]
        reference = Reference(probs, torch.stack([block.sum(1) for block in probs], 1))
        stats = row_stats(logits, reference)
        mass = reference.masses.sum(1)
        return cls(logits, stats, reference, mass, stats.cross - stats.log_total * mass)
