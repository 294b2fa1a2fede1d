"""Per-layer evaluation of lenses on stored states (METHODS §1 metrics), in long format.

For each lens and layer, over held-out tokens: KL(p_final || p_lens) in nats, cross-entropy to the next
token, entropy of p_lens, top-1 agreement with the model's final prediction (Ghandeharioun et al.'s
Precision@1 when the reader is a patchscope), surprisal -log p_final(argmax p_lens) (their surprisal: the
reader's top-1 scored under the model's own distribution, in nats), the rank of the final top-1 token under
the lens (median; 0 = top), and top-1 agreement with the logit lens.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch.nn import functional

from latent_atlas.addresses import resid_address
from latent_atlas.errors import ConfigError
from latent_atlas.lenses.base import Lens, Unembed
from latent_atlas.store import ActivationStore


@dataclass(frozen=True)
class EvaluationTokens:
    """Store rows to evaluate on, with the next token of each (-1 where the document ends)."""

    rows: np.ndarray
    next_ids: np.ndarray


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
    if max_tokens and len(rows) > max_tokens:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_tokens, replace=False))
        rows, next_ids = rows[pick], next_ids[pick]
    return EvaluationTokens(rows, next_ids)


@torch.no_grad()
def evaluate_lenses(
    store: ActivationStore,
    unembed: Unembed,
    lenses: Mapping[str, Lens],
    layers: Sequence[int],
    tokens: EvaluationTokens,
    chunk_size: int = 512,
) -> pl.DataFrame:
    """Evaluate every lens at every layer; returns one row per (lens, layer, metric).

    Columns: ``lens``, ``address``, ``layer``, ``metric``, ``value``, ``n_tokens``.
    """
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        raise ConfigError(
            f"lenses.layers asks for layers {missing}, which the store does not hold (stored: {store.layers}); "
            "add them to extraction.layers or drop them from lenses.layers"
        )
    sums: dict[tuple[str, int, str], float] = {}
    counts: dict[tuple[str, int, str], int] = {}
    ranks: dict[tuple[str, int], list[np.ndarray]] = {}
    logit_lens = lenses.get("logit")
    for start in range(0, len(tokens.rows), chunk_size):
        rows = tokens.rows[start : start + chunk_size]
        next_ids = torch.from_numpy(tokens.next_ids[start : start + chunk_size]).long()
        final = FinalDistribution.from_logits(unembed.lm_head(torch.from_numpy(store.read("ln_final", rows))))
        for layer in layers:
            states = torch.from_numpy(store.read(layer, rows))
            logit_logits = logit_lens.logits(states, layer) if logit_lens is not None else None
            logit_top1 = logit_logits.argmax(-1) if logit_logits is not None else None
            for name, lens in lenses.items():
                if not lens.reads(layer):
                    continue
                logits = logit_logits if lens is logit_lens else lens.logits(states, layer)
                values = _token_metrics(logits, final, next_ids, logit_top1)
                for metric, (total, count) in values.items():
                    if metric == "final_top1_rank":
                        ranks.setdefault((name, layer), []).append(total)
                        continue
                    key = (name, layer, metric)
                    sums[key] = sums.get(key, 0.0) + total
                    counts[key] = counts.get(key, 0) + count
    records = [
        _record(name, layer, metric, sums[(name, layer, metric)] / count, count)
        for (name, layer, metric), count in counts.items()
        if count
    ]
    for (name, layer), parts in ranks.items():
        values = np.concatenate(parts)
        records.append(_record(name, layer, "final_top1_rank", float(np.median(values)), len(values)))
    return pl.DataFrame(records).sort("lens", "layer", "metric")


def _record(lens: str, layer: int, metric: str, value: float, n_tokens: int) -> dict[str, object]:
    """One row of the long-format table."""
    address = resid_address(layer)
    return {"lens": lens, "address": address, "layer": layer, "metric": metric, "value": value, "n_tokens": n_tokens}


def _token_metrics(
    logits: torch.Tensor, final: "FinalDistribution", next_ids: torch.Tensor, logit_top1: torch.Tensor | None
) -> dict[str, tuple]:
    """Sums (and counts) of each metric over one chunk of tokens.

    V-sized temporaries are kept to three (logits, log-probabilities, probabilities); row-wise dot
    products go through ``bmm`` instead of materialising elementwise products.
    """
    log_probs = functional.log_softmax(logits.float(), dim=-1)
    del logits
    cross = torch.bmm(final.probs[:, None, :], log_probs[:, :, None]).view(-1)  # sum_v p_final log p_lens
    kl = final.neg_entropy - cross
    entropy = -torch.bmm(log_probs.exp()[:, None, :], log_probs[:, :, None]).view(-1)
    top1 = log_probs.argmax(-1)
    has_next = next_ids >= 0
    ce = -log_probs[has_next].gather(-1, next_ids[has_next, None]).squeeze(-1)
    surprisal = -final.log_probs.gather(-1, top1[:, None]).squeeze(-1)
    rank = (log_probs > log_probs.gather(-1, final.top1[:, None])).sum(-1)
    n = len(log_probs)
    metrics: dict[str, tuple] = {
        "kl_to_final": (float(kl.sum()), n),
        "entropy": (float(entropy.sum()), n),
        "top1_agreement": (float((top1 == final.top1).sum()), n),
        "surprisal": (float(surprisal.sum()), n),
        "ce_next_token": (float(ce.sum()), int(has_next.sum())),
        "final_top1_rank": (rank.numpy(), n),
    }
    if logit_top1 is not None:
        metrics["agreement_with_logit"] = (float((top1 == logit_top1).sum()), n)
    return metrics


@dataclass(frozen=True)
class FinalDistribution:
    """The model's own next-token distribution for a chunk of tokens, computed once for every lens."""

    log_probs: torch.Tensor
    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top1: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "FinalDistribution":
        """Log-probabilities, probabilities, sum p log p and arg-max of the final logits."""
        log_probs = functional.log_softmax(logits.float(), dim=-1)
        probs = log_probs.exp()
        neg_entropy = torch.bmm(probs[:, None, :], log_probs[:, :, None]).view(-1)
        return cls(log_probs, probs, neg_entropy, log_probs.argmax(-1))
