"""Parameter projections to the vocabulary (Dar, Geva, Gupta, Berant 2023; METHODS §3).

With E = W_U^T (d x V): an MLP key or value vector v reads as v E in R^V; a head's OV and QK circuits read
as the V x V bilinear forms E^T W_V W_O E and E^T W_Q W_K^T E. Those are never materialised (49152^2 floats
is 9.7 GB): they are the products of rank-d_h factors (E^T W_V)(W_O E), scanned in row blocks while a
running top-k is kept. Weights are read as stored: block-norm gains are not folded in, and RoPE is ignored
(the QK form is exact at relative offset 0 only). Gated keys (SwiGLU/GeGLU, Phi-3's fused gate-up split as
the model splits it) are reported for both the gate (primary) and the up projection; grouped and multi-query
heads use their KV group's W_K / W_V; fused QKV weights are split in the model's own order
(:mod:`latent_atlas.architectures`).

The paper's check that the projections mean something (its notebook ``interpretation-experiments.ipynb``):
on held-out text, the top-b activated neurons of a block at each position, their keys and values read in the
vocabulary (top-k tokens each, pooled), should recall the top-k tokens of the block's own output read through
the final norm and unembedding (N_f(x^l) E) far better than the neurons of another position do
(:func:`activation_recall`).
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from latent_atlas.architectures import HeadFactors, HeadShape, MlpLayout, head_shape, mlp_layout, require
from latent_atlas.architectures import head_factors as architecture_head_factors
from latent_atlas.errors import ConfigError, ModelAcquisitionError
from latent_atlas.models import LoadedModel
from latent_atlas.stats import bootstrap_mean

MlpVectors = MlpLayout
"""Key and value vectors of one MLP layer (see :class:`latent_atlas.architectures.MlpLayout`)."""


def mlp_vectors(block: nn.Module) -> MlpLayout:
    """Key vectors (rows that read the stream) and value vectors (rows written to it) of a block's MLP.

    Gated (Llama-likes: ``key_gate`` and ``key_up``), fused gate-up (Phi-3, split as the model splits it) and
    two-matrix layouts (GPT-2, GPT-NeoX, GPT-J, OPT, Falcon, Bloom, Phi: ``key``); see
    :func:`latent_atlas.architectures.mlp_layout`.
    """
    return mlp_layout(block)


def head_factors(block: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int) -> HeadFactors:
    """Per-head matrices of a block's attention, separate or fused QKV (grouped: head h uses group h // (H / H_kv))."""
    return architecture_head_factors(block, HeadShape(n_heads, n_kv_heads, head_dim))


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


NeuronTokens = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]
"""Per block and kind (``key_gate``, ``key_up``, ``value``; GPT-2 ``key``, ``value``): the ``(d_ff, k)`` ids of
every neuron's top-k and bottom-k vocabulary scores."""


@torch.no_grad()
def mlp_token_ids(loaded: LoadedModel, layers: Sequence[int], k: int) -> NeuronTokens:
    """Top-k and bottom-k token ids of every MLP key and value vector of the given blocks (``v E``, no norm)."""
    require(loaded.model, "mlp_projections")
    w_u = loaded.parts.lm_head.weight.detach()
    k = min(k, w_u.shape[0])
    found: NeuronTokens = {}
    for layer, block in _iter_layers(loaded, layers):
        vectors = mlp_vectors(block)
        found[layer] = {
            kind: top_tokens(matrix, w_u, k) for kind, matrix in [*vectors.keys.items(), ("value", vectors.values)]
        }
    return found


@torch.no_grad()
def project_mlp(
    loaded: LoadedModel,
    layers: Sequence[int],
    k: int = 10,
    overlap_k: int = 100,
    seed: int = 0,
    token_ids: NeuronTokens | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Top/bottom tokens of every MLP key and value vector, and the aligned-vs-shuffled overlap check.

    Args:
        loaded: the model.
        layers: blocks to read (1..L).
        k: top and bottom tokens kept per vector in the tokens table.
        overlap_k: tokens compared in the key/value overlap check.
        seed: seed of the neuron permutation (the shuffled pairs).
        token_ids: :func:`mlp_token_ids` of these blocks with at least ``max(k, overlap_k)`` tokens, when
            already computed (the recall check reuses them); computed here otherwise.

    Returns:
        ``(tokens, alignment)``: tokens has one row per (layer, neuron, kind, direction, rank); alignment
        the mean Jaccard overlap of the top-``overlap_k`` tokens of each neuron's key and value (aligned)
        against keys paired with the values of randomly permuted neurons (shuffled).
    """
    if token_ids is None:
        token_ids = mlp_token_ids(loaded, layers, max(k, overlap_k))
    rows, checks = [], []
    generator = torch.Generator().manual_seed(seed)
    for layer, _block in _iter_layers(loaded, layers):
        kinds = token_ids[layer]
        tops = {kind: top[:, :overlap_k] for kind, (top, _bottom) in kinds.items()}
        for kind, (top, bottom) in kinds.items():
            for direction, ids in (("top", top[:, :k]), ("bottom", bottom[:, :k])):
                rows.append(_token_rows(layer, kind, direction, ids))
        permutation = torch.randperm(tops["value"].shape[0], generator=generator)
        for kind in (kind for kind in kinds if kind != "value"):
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
        loaded: the model (separate or fused QKV attention).
        layers: blocks to read (1..L).
        k: pairs per head and circuit.
        vocabulary: optional token ids to restrict both sides to (a frequent sub-vocabulary: 25x faster
            with 10 k tokens); default: the whole vocabulary.
    """
    require(loaded.model, "head_projections")
    shape = head_shape(loaded.model.config)
    w_u = loaded.parts.lm_head.weight.detach()
    ids = torch.arange(w_u.shape[0]) if vocabulary is None else vocabulary
    w_u = w_u[ids]
    frames = []
    for layer, block in _iter_layers(loaded, layers):
        heads = architecture_head_factors(block, shape)
        for head in range(shape.n_heads):
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


@dataclass(frozen=True)
class RecallStates:
    """What one forward pass over held-out text leaves for the recall check, ``N`` positions in all.

    Attributes:
        activations: block -> ``(N, d_ff)`` neuron activations (the input of the MLP's writer).
        outputs: block -> ``(N, d)`` block outputs x^l (raw, before any norm).
        final: ``(N, d)`` the final norm's output N_f(x^L), which the LM head reads.
        documents: ``(N,)`` index of the document each position comes from (positions grouped by document).
    """

    activations: dict[int, torch.Tensor]
    outputs: dict[int, torch.Tensor]
    final: torch.Tensor
    documents: torch.Tensor


@torch.no_grad()
def collect_recall_states(
    loaded: LoadedModel, texts: Sequence[str], layers: Sequence[int], positions: int, max_length: int
) -> RecallStates:
    """Neuron activations and block outputs at the first ``positions`` positions of ``texts``.

    Texts run one at a time, each cut at ``max_length`` tokens, until ``positions`` positions are collected;
    every position counts, the first included (the paper's notebook keeps them all).
    """
    require(loaded.model, "mlp_projections")
    found: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        found.setdefault(name, []).append(tensor.detach()[0].float().cpu())

    handles = []
    for layer, block in _iter_layers(loaded, layers):
        writer = mlp_vectors(block).writer
        handles.append(writer.register_forward_pre_hook(lambda _m, args, name=f"a{layer}": keep(name, args[0])))
        handles.append(block.register_forward_hook(lambda _m, _a, out, name=f"x{layer}": keep(name, _first(out))))
    handles.append(loaded.parts.final_norm.register_forward_hook(lambda _m, _a, out: keep("final", out)))
    documents, total = [], 0
    try:
        for index, text in enumerate(texts):
            if total >= positions:
                break
            encoded = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            ids = encoded["input_ids"].to(loaded.device)
            loaded.parts.body(input_ids=ids, use_cache=False)
            documents.append(torch.full((ids.shape[1],), index))
            total += ids.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    if len(documents) < 2:
        raise ConfigError(
            "the recall check needs positions from at least two documents (shuffled neurons come from another "
            "document): lower projections.recall_max_length or raise projections.recall_positions, or use a "
            "corpus whose split holds more documents"
        )

    def joined(name: str) -> torch.Tensor:
        return torch.cat(found[name])[:positions]

    return RecallStates(
        activations={layer: joined(f"a{layer}") for layer in layers},
        outputs={layer: joined(f"x{layer}") for layer in layers},
        final=joined("final"),
        documents=torch.cat(documents)[:positions],
    )


def _first(output: object) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


@torch.no_grad()
def state_top_ids(
    loaded: LoadedModel, states: torch.Tensor, k: int, normed: bool, block_rows: int = 256
) -> torch.Tensor:
    """Top-k token ids ``(N, k)`` of states ``(N, d)`` read in the vocabulary.

    The read-out is ``lm_head(N_f(h))``, or ``lm_head(h)`` when ``normed`` (``h`` is the final norm's output).
    """
    parts = loaded.parts
    device = parts.lm_head.weight.device
    dtype = parts.lm_head.weight.dtype
    tops = []
    for start in range(0, len(states), block_rows):
        rows = states[start : start + block_rows].to(device=device, dtype=dtype)
        logits = parts.lm_head(rows if normed else parts.final_norm(rows))
        tops.append(logits.float().topk(k, dim=-1).indices.cpu())
    return torch.cat(tops)


def other_document_positions(documents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each position, a position drawn uniformly from the other documents (``documents`` grouped, ``(N,)``)."""
    _, counts = torch.unique_consecutive(documents, return_counts=True)
    if len(counts) < 2:
        raise ValueError("positions from at least two documents are needed")
    starts = torch.cumsum(counts, 0) - counts
    own_start = torch.repeat_interleave(starts, counts)
    own_count = torch.repeat_interleave(counts, counts)
    draw = (torch.rand(len(documents), generator=generator) * (len(documents) - own_count)).long()
    draw = torch.minimum(draw, len(documents) - own_count - 1)
    return torch.where(draw < own_start, draw, draw + own_count)


def pooled_recall(neuron_ids: torch.Tensor, active: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Recall |A ∩ B| / |B| per position: B the target ids, A the union of the active neurons' ids.

    Args:
        neuron_ids: ``(d_ff, k)`` top token ids of every neuron.
        active: ``(N, b)`` the neurons taken at each position.
        target: ``(N, k2)`` distinct target ids of each position.

    Returns:
        ``(N,)`` recall in [0, 1].
    """
    pooled = neuron_ids[active].reshape(len(active), -1)
    return (target[:, :, None] == pooled[:, None, :]).any(-1).float().mean(-1)


def activation_recall(
    loaded: LoadedModel,
    states: RecallStates,
    token_ids: NeuronTokens,
    neurons: int = 5,
    k: int = 50,
    seed: int = 0,
) -> pl.DataFrame:
    """Dar et al.'s aligned-vs-shuffled recall of a state's vocabulary projection by its activated neurons.

    At each position and block: the ``neurons`` most activated neurons (largest activation); the union of the
    top-``k`` tokens of their keys (and, separately, values) in the vocabulary; the recall of the top-``k``
    tokens of the target state's projection among them. Targets: ``layer`` (N_f(x^l) E, the block's own
    output) and ``final`` (the model's prediction, N_f(x^L) E). Shuffled: the same with the neurons activated
    at a position of another document.

    Returns:
        One row per (layer, target, kind): mean ``aligned`` and ``shuffled`` recall with their 95 % percentile
        intervals over documents (``aligned_ci_low`` ...; positions of one document are not independent, so
        whole documents are resampled), the paired ``difference`` aligned − shuffled (same positions) with
        ``ci_low``, ``ci_high``, ``n`` documents and ``unit``, ``positions``, ``documents``, ``neurons``, ``k``.
    """
    generator = torch.Generator().manual_seed(seed)
    donors = other_document_positions(states.documents, generator)
    targets = {"final": state_top_ids(loaded, states.final, k, normed=True)}
    rows = []
    for layer, activations in states.activations.items():
        if token_ids[layer]["value"][0].shape[1] < k:
            raise ValueError(f"token_ids hold fewer than k={k} tokens per neuron")
        active = activations.topk(neurons, dim=-1).indices
        last = layer == loaded.n_layers  # N_f(x^L) is the final target already
        targets["layer"] = targets["final"] if last else state_top_ids(loaded, states.outputs[layer], k, normed=False)
        for target in ("layer", "final"):
            for kind, (top, _bottom) in token_ids[layer].items():
                aligned = pooled_recall(top[:, :k], active, targets[target])
                shuffled = pooled_recall(top[:, :k], active[donors], targets[target])
                rows.append(
                    {
                        "layer": layer,
                        "target": target,
                        "kind": kind,
                        "aligned": float(aligned.mean()),
                        "shuffled": float(shuffled.mean()),
                        **_recall_intervals(aligned, shuffled, states.documents, seed),
                        "positions": len(aligned),
                        "documents": int(states.documents.unique().numel()),
                        "neurons": neurons,
                        "k": k,
                    }
                )
    return pl.DataFrame(rows)


def _recall_intervals(
    aligned: torch.Tensor, shuffled: torch.Tensor, documents: torch.Tensor, seed: int
) -> dict[str, float | int | str]:
    """Document-bootstrap intervals of aligned and shuffled recall and of their paired difference."""
    units = documents.numpy()
    aligned_, shuffled_ = aligned.double().numpy(), shuffled.double().numpy()
    columns: dict[str, float | int | str] = {}
    for name, values in (("aligned", aligned_), ("shuffled", shuffled_)):
        interval = bootstrap_mean(values, units, unit="document", seed=seed)
        columns |= {f"{name}_ci_low": interval.low, f"{name}_ci_high": interval.high}
    difference = bootstrap_mean(aligned_ - shuffled_, units, unit="document", seed=seed)
    return columns | {"difference": difference.estimate, **difference.columns()}


def recall_texts(corpus: pl.DataFrame, split: str, seed: int = 0) -> list[str]:
    """The documents of a corpus split in a seeded random order (so the first positions span many documents).

    Raises:
        ConfigError: when the split holds fewer than two documents.
    """
    texts = corpus.filter(pl.col("split") == split)["text"].to_list()
    if len(texts) < 2:
        raise ConfigError(
            f"projections.recall_split = {split!r} holds {len(texts)} document(s) of the corpus; the recall check "
            "needs at least two (use 'train' or 'heldout', whichever holds more)"
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    return [texts[i] for i in order.tolist()]
