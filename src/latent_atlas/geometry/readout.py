"""Readout rescaling: is cosine meaningful at the readout (Steck, Ekanadham & Kallus 2024; METHODS §8.7)?

The final norm's gain γ and the unembedding W_U can trade any diagonal rescaling without changing a single
logit: ``W_U · diag(γ)`` applied to the gain-free normalised state ``n(x)`` gives the same logits as ``W_U``
applied to ``γ ⊙ n(x)``. Cosines in readout space are not so invariant. This module checks the first claim
on the model's own text and measures how much the second moves: the mean cosine of unembedding rows, the
overlap of their nearest neighbours, and the mean cosine of final-norm outputs, each with γ on either side.
A scalar rescaling ``cI`` must leave every cosine unchanged (reported as a control).
"""

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from latent_atlas.models import LoadedModel


def norm_gain(final_norm: nn.Module, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm's elementwise gain γ and bias β, so that ``final_norm(x) = γ ⊙ n(x) + β``.

    LayerNorm reads them from its parameters; an RMS norm (Llama's ``weight``, Gemma's ``1 + weight``) is
    measured on the all-ones input, whose RMS normalisation is exactly ``1 / √(1 + ε)``.
    """
    weight = next(final_norm.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    if isinstance(final_norm, nn.LayerNorm):
        gain = final_norm.weight.detach() if final_norm.weight is not None else torch.ones(d, dtype=dtype)
        bias = final_norm.bias.detach() if final_norm.bias is not None else torch.zeros(d, dtype=dtype)
    else:
        eps = float(getattr(final_norm, "variance_epsilon", getattr(final_norm, "eps", 0.0)))
        with torch.no_grad():
            gain = final_norm(torch.ones(1, d, dtype=dtype))[0] * math.sqrt(1 + eps)
        bias = torch.zeros(d, dtype=dtype)
    if gain.abs().min() < 1e-6:
        raise ValueError("the final norm has a (near-)zero gain in some dimension: it cannot be moved into W_U")
    return gain, bias


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pair_cosine(rows: torch.Tensor, pairs: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Mean cosine of the given row pairs, of ``rows`` or of ``rows · diag(scale)`` (never materialised)."""
    u, v = rows[pairs[:, 0]].double(), rows[pairs[:, 1]].double()
    if scale is not None:
        u, v = u * scale, v * scale
    return float((_unit(u) * _unit(v)).sum(-1).mean())


def _nearest_rows(matrix: torch.Tensor, queries: torch.Tensor, k: int, scale: torch.Tensor, block: int) -> torch.Tensor:
    """The ``k`` cosine-nearest rows (query itself excluded) of ``matrix · diag(scale)``, in vocabulary blocks."""
    scale = scale.to(matrix.dtype)
    query = _unit(matrix[queries] * scale) * scale  # (q ⊙ s)/|q ⊙ s| · (m ⊙ s) = ((q ⊙ s)/|q ⊙ s| ⊙ s) · m
    scores = torch.empty(len(queries), len(matrix), dtype=matrix.dtype)
    for start in range(0, len(matrix), block):
        rows = matrix[start : start + block]
        scores[:, start : start + block] = (query @ rows.T) / (rows * scale).norm(dim=-1).clamp_min(1e-12)
    scores[torch.arange(len(queries)), queries] = -torch.inf
    return scores.topk(k, dim=-1).indices


def neighbour_overlap(
    matrix: torch.Tensor, scale: torch.Tensor, queries: torch.Tensor, k: int = 10, block: int = 16384
) -> float:
    """Mean Jaccard overlap of each query row's ``k`` cosine-nearest rows in ``matrix`` and ``matrix · diag(scale)``."""
    near_a = _nearest_rows(matrix, queries, k, torch.ones_like(scale), block).tolist()
    near_b = _nearest_rows(matrix, queries, k, scale, block).tolist()
    return float(np.mean([len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(near_a, near_b, strict=True)]))


def _final_norm_states(loaded: LoadedModel, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
    """Inputs to the final norm at every position of the texts (each text truncated to ``max_tokens``)."""
    captured: list[torch.Tensor] = []
    hook = loaded.parts.final_norm.register_forward_hook(lambda _m, args, _out: captured.append(args[0][0].detach()))
    try:
        with torch.inference_mode():
            for text in texts:
                ids = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids
                loaded.model.base_model(input_ids=ids.to(loaded.device))  # no LM head: only the norm's input
    finally:
        hook.remove()
    return torch.cat(captured).cpu()


def readout_rescaling(
    loaded: LoadedModel,
    texts: Sequence[str],
    max_tokens: int = 128,
    pairs: int = 20000,
    logit_positions: int = 32,
    seed: int = 0,
) -> pl.DataFrame:
    """Steck's check on a model: logits under γ folded into W_U, and the cosines that move.

    Returns one row per quantity (``quantity``, ``value``, ``description``).
    """
    parts = loaded.parts
    unembedding = parts.lm_head.weight.detach().cpu().float()
    vocab, d = unembedding.shape
    final_norm = copy.deepcopy(parts.final_norm).cpu().double()
    gain, bias = norm_gain(final_norm, d)
    hidden = _final_norm_states(loaded, texts, max_tokens).double()
    with torch.inference_mode():
        normed = final_norm(hidden)
    free = (normed - bias) / gain  # n(x): the normalised state without the gain
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(free), generator=generator)[:logit_positions]
    head = unembedding.double()
    logits = normed[positions] @ head.T  # every logit of the vocabulary at the sampled positions
    folded = free[positions] @ (head * gain).T + bias @ head.T
    del head
    vocab_pairs = torch.randint(0, vocab, (pairs, 2), generator=generator)
    state_pairs = torch.randint(0, len(free), (pairs, 2), generator=generator)
    queries = torch.randperm(vocab, generator=generator)[:200]
    rows: list[tuple[str, float, str]] = [
        ("max_abs_logit_change", float((logits - folded).abs().max()), "γ moved into W_U: must be ~0"),
        ("max_abs_logit", float(logits.abs().max()), "scale of the logits compared"),
        ("positions", float(len(positions)), "positions whose logits are compared (of every text position)"),
        ("unembedding_mean_cosine", mean_pair_cosine(unembedding, vocab_pairs), "rows of W_U"),
        ("unembedding_mean_cosine_folded", mean_pair_cosine(unembedding, vocab_pairs, gain), "rows of W_U·diag(γ)"),
        ("unembedding_neighbour_overlap", neighbour_overlap(unembedding, gain.float(), queries),
         "Jaccard of 10 cosine-nearest rows, W_U vs W_U·diag(γ)"),
        ("final_norm_mean_cosine", mean_pair_cosine(normed, state_pairs), "final-norm outputs γ ⊙ n(x)"),
        ("final_norm_mean_cosine_gain_free", mean_pair_cosine(free, state_pairs), "gain-free n(x)"),
        ("scalar_rescaling_cosine_change",
         abs(mean_pair_cosine(unembedding, vocab_pairs, torch.full((d,), 3.0, dtype=torch.float64))
             - mean_pair_cosine(unembedding, vocab_pairs)),
         "control: cI leaves cosines unchanged"),
        ("gain_min", float(gain.min()), "γ"),
        ("gain_max", float(gain.max()), "γ"),
    ]  # fmt: skip
    return pl.DataFrame(rows, schema=["quantity", "value", "description"], orient="row")


def readout_texts(corpus: Any, split: str, count: int) -> list[str]:
    """The first ``count`` texts of a corpus split (the check needs a little real text, not much)."""
    texts = corpus.filter(pl.col("split") == split)["text"].to_list()
    return texts[:count] or corpus["text"].to_list()[:count]
