"""Parameter projections to the vocabulary (Dar, Geva, Gupta, Berant 2023; METHODS §3).

With E = W_U^T (d x V): an MLP key or value vector v reads as v E in R^V; a head's OV and QK circuits read
as the V x V bilinear forms E^T W_V W_O E and E^T W_Q W_K^T E. Those are never materialised (49152^2 floats
is 9.7 GB): they are the products of rank-d_h factors (E^T W_V)(W_O E), scanned in row blocks while a
running top-k is kept. Weights are read as stored: block-norm gains are not folded in, and RoPE is ignored
(the QK form is exact at relative offset 0 only). Llama/Gemma SwiGLU keys are reported for both the gate
(primary) and the up projection; GQA heads use their KV group's W_K / W_V.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from latent_atlas.errors import ModelAcquisitionError
from latent_atlas.models import LoadedModel


@dataclass(frozen=True)
class MlpVectors:
    """Key and value vectors of one MLP layer, each ``(d_ff, d)``; ``keys`` maps a kind to its matrix."""

    keys: dict[str, torch.Tensor]
    values: torch.Tensor


def mlp_vectors(block: nn.Module) -> MlpVectors:
    """Key vectors (rows that read the stream) and value vectors (rows written to it) of a block's MLP."""
    mlp = block.mlp
    if hasattr(mlp, "down_proj"):  # Llama, Gemma, Mistral, Qwen: SwiGLU
        return MlpVectors(
            {"key_gate": mlp.gate_proj.weight.detach(), "key_up": mlp.up_proj.weight.detach()},
            mlp.down_proj.weight.detach().T,
        )
    if hasattr(mlp, "c_fc"):  # GPT-2: Conv1D weights are stored (in, out)
        return MlpVectors({"key": mlp.c_fc.weight.detach().T}, mlp.c_proj.weight.detach())
    raise ModelAcquisitionError(f"unknown MLP layout {type(mlp).__name__}: add it to latent_atlas.lenses.projections")


@dataclass(frozen=True)
class HeadFactors:
    """Per-head W_Q, W_K, W_V (each ``(d, d_h)``) and W_O (``(d_h, d)``) of one attention block."""

    query: list[torch.Tensor]
    key: list[torch.Tensor]
    value: list[torch.Tensor]
    output: list[torch.Tensor]


def head_factors(block: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int) -> HeadFactors:
    """Split a Llama-style attention block into per-head matrices (GQA: head h uses group h // (H / H_kv))."""
    attention = getattr(block, "self_attn", None)
    if attention is None or not hasattr(attention, "q_proj"):
        raise ModelAcquisitionError("head projections support q/k/v/o_proj attention (Llama, Gemma, Mistral, Qwen)")
    q, k, v = (getattr(attention, f"{n}_proj").weight.detach() for n in "qkv")
    o = attention.o_proj.weight.detach()
    group = n_heads // n_kv_heads

    def rows(weight: torch.Tensor, index: int) -> torch.Tensor:
        return weight[index * head_dim : (index + 1) * head_dim].T

    return HeadFactors(
        query=[rows(q, h) for h in range(n_heads)],
        key=[rows(k, h // group) for h in range(n_heads)],
        value=[rows(v, h // group) for h in range(n_heads)],
        output=[o[:, h * head_dim : (h + 1) * head_dim].T for h in range(n_heads)],
    )


def vocabulary_scores(vectors: torch.Tensor, unembedding: torch.Tensor) -> torch.Tensor:
    """``vectors @ E`` with E = W_U^T: each ``(d,)`` vector read as ``(V,)`` scores (no final norm)."""
    return vectors.float() @ unembedding.float().T


def top_tokens(vectors: torch.Tensor, unembedding: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the top-k and bottom-k vocabulary scores of each vector, each ``(n, k)``."""
    scores = vocabulary_scores(vectors, unembedding)
    return scores.topk(k, dim=-1).indices, scores.topk(k, dim=-1, largest=False).indices


def bilinear_top_k(
    left: torch.Tensor, right: torch.Tensor, k: int, block_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k entries of ``left @ right`` (``(V1, r) @ (r, V2)``) without materialising it.

    Returns:
        ``(scores, rows, columns)``, each of length k, in descending order of score.
    """
    best_scores = torch.empty(0)
    best_index = torch.empty(0, dtype=torch.long)
    width = right.shape[1]
    for start in range(0, left.shape[0], block_rows):
        block = left[start : start + block_rows].float() @ right.float()
        scores, flat = block.reshape(-1).topk(min(k, block.numel()))
        best_scores = torch.cat([best_scores, scores])
        best_index = torch.cat([best_index, flat + start * width])
        keep = best_scores.topk(min(k, len(best_scores))).indices
        best_scores, best_index = best_scores[keep], best_index[keep]
    order = best_scores.argsort(descending=True)
    best_scores, best_index = best_scores[order], best_index[order]
    return best_scores, best_index // width, best_index % width


def circuit_factors(heads: HeadFactors, head: int, unembedding: torch.Tensor) -> dict[str, tuple]:
    """The rank-d_h factors (left ``(V, d_h)``, right ``(d_h, V)``) of a head's OV and QK vocabulary forms."""
    w_u = unembedding.float()
    return {
        "OV": (w_u @ heads.value[head].float(), heads.output[head].float() @ w_u.T),
        "QK": (w_u @ heads.query[head].float(), heads.key[head].float().T @ w_u.T),
    }


def _iter_layers(loaded: LoadedModel, layers: Sequence[int]) -> Iterator[tuple[int, nn.Module]]:
    """Blocks by residual layer number (block l writes resid.l)."""
    for layer in layers:
        if not 1 <= layer <= loaded.n_layers:
            raise ModelAcquisitionError(f"parameter projections take blocks 1..{loaded.n_layers}, got {layer}")
        yield layer, loaded.parts.layers[layer - 1]


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise Jaccard overlap of two ``(n, k)`` id sets."""
    return np.array([len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)])


@torch.no_grad()
def project_mlp(
    loaded: LoadedModel, layers: Sequence[int], k: int = 10, overlap_k: int = 100, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Top/bottom tokens of every MLP key and value vector, and the aligned-vs-shuffled overlap check.

    Returns:
        ``(tokens, alignment)``: tokens has one row per (layer, neuron, kind, direction, rank); alignment
        the mean Jaccard overlap of the top-``overlap_k`` tokens of each neuron's key and value (aligned)
        against keys paired with the values of randomly permuted neurons (shuffled).
    """
    w_u = loaded.parts.lm_head.weight.detach()
    rows, checks = [], []
    generator = torch.Generator().manual_seed(seed)
    for layer, block in _iter_layers(loaded, layers):
        vectors = mlp_vectors(block)
        tops: dict[str, torch.Tensor] = {}
        for kind, matrix in [*vectors.keys.items(), ("value", vectors.values)]:
            top, bottom = top_tokens(matrix, w_u, max(k, overlap_k))
            tops[kind] = top[:, :overlap_k]
            for direction, ids in (("top", top[:, :k]), ("bottom", bottom[:, :k])):
                rows.append(_token_rows(layer, kind, direction, ids))
        permutation = torch.randperm(vectors.values.shape[0], generator=generator)
        for kind in vectors.keys:
            aligned = _jaccard(tops[kind], tops["value"])
            shuffled = _jaccard(tops[kind], tops["value"][permutation])
            checks.append(
                {
                    "layer": layer,
                    "pair": f"{kind}/value",
                    "aligned": float(aligned.mean()),
                    "shuffled": float(shuffled.mean()),
                }
            )
    return pl.concat(rows), pl.DataFrame(checks)


def _token_rows(layer: int, kind: str, direction: str, ids: torch.Tensor) -> pl.DataFrame:
    """Long-format rows for a ``(neurons, k)`` id matrix."""
    neurons, k = ids.shape
    return pl.DataFrame(
        {
            "layer": np.full(neurons * k, layer, dtype=np.int32),
            "neuron": np.repeat(np.arange(neurons, dtype=np.int32), k),
            "kind": kind,
            "direction": direction,
            "rank": np.tile(np.arange(k, dtype=np.int32), neurons),
            "token_id": ids.reshape(-1).numpy().astype(np.int32),
        }
    )


@torch.no_grad()
def project_heads(
    loaded: LoadedModel, layers: Sequence[int], k: int = 20, vocabulary: torch.Tensor | None = None
) -> pl.DataFrame:
    """Top-k (source token, target token) pairs of every head's OV and QK vocabulary form.

    Args:
        loaded: the model (Llama-style attention).
        layers: blocks to read (1..L).
        k: pairs per head and circuit.
        vocabulary: optional token ids to restrict both sides to (a frequent sub-vocabulary: 25x faster
            with 10 k tokens); default: the whole vocabulary.
    """
    config = loaded.model.config.get_text_config()
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    w_u = loaded.parts.lm_head.weight.detach()
    ids = torch.arange(w_u.shape[0]) if vocabulary is None else vocabulary
    w_u = w_u[ids]
    frames = []
    for layer, block in _iter_layers(loaded, layers):
        heads = head_factors(block, n_heads, n_kv, head_dim)
        for head in range(n_heads):
            for circuit, (left, right) in circuit_factors(heads, head, w_u).items():
                scores, sources, targets = bilinear_top_k(left, right, k)
                frames.append(
                    pl.DataFrame(
                        {
                            "layer": layer,
                            "head": head,
                            "circuit": circuit,
                            "rank": np.arange(len(scores), dtype=np.int32),
                            "source_id": ids[sources].numpy().astype(np.int32),
                            "target_id": ids[targets].numpy().astype(np.int32),
                            "score": scores.numpy(),
                        }
                    )
                )
    return pl.concat(frames)
