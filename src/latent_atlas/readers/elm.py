"""ELM, an embedding language model (Tennenholtz et al., ICLR 2024; METHODS §6): the LM talks about a vector.

A domain embedding ``w ∈ R^{d_w}`` (here computed from the LM's own hidden states) is mapped by a small MLP
adapter to ``n_soft`` soft tokens in the LM's input-embedding space; they replace the placeholder
:data:`EMBEDDING_PLACEHOLDER` of a prompt, and the LM is trained to continue the prompt with a target text
(next-token cross-entropy on the target tokens only).

- Norms: every soft token is rescaled to a fixed ``target_norm``, by default the median norm of the embedding
  module's *output* over the vocabulary (so Gemma's ``sqrt(d)`` scale, applied inside its embedding module,
  is included; METHODS §0.4). Soft tokens far off the token-norm range are the main way an ELM fails.
- Stage 1 trains the adapter only: the LM's parameters are frozen (no gradients, no optimiser state, eval
  mode), so its outputs on any text without a soft token are bit-identical before and after training.
  Stage 2 also fine-tunes the LM; it changes the base model, so that check no longer holds.
- Conditions for evaluation: ``true`` (each example's own embedding), ``shuffled`` (a seeded derangement of
  the examples' embeddings: no example keeps its own) and ``none`` (the placeholder removed, no soft token).
- A judge for semantic consistency: mean-pooled hidden states of another model (:func:`mean_pooled_states`),
  compared by cosine (:func:`semantic_consistency`).

Sequences are ``[BOS] prompt-before · soft tokens · prompt-after · target · EOS``: each piece is tokenised on
its own, without special tokens; the BOS is added only where the tokenizer adds one to plain text.
"""

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from latent_atlas.errors import ConfigError, LatentAtlasError
from latent_atlas.models import LoadedModel, ModelParts
from latent_atlas.provenance import atomic_output

EMBEDDING_PLACEHOLDER = "<embedding>"
CONDITIONS = ("true", "shuffled", "none")
IGNORE_INDEX = -100
_SOFT = -1  # marks a soft-token slot in a row of token ids
LOSS_SCHEMA = {
    "step": pl.Int64,
    "examples_seen": pl.Int64,
    "train_loss": pl.Float64,
    "heldout_loss": pl.Float64,
}


# --------------------------------------------------------------------------------------------------
# Token-embedding norms and the adapter


@dataclass(frozen=True)
class EmbeddingNorms:
    """Statistics of ‖embed(t)‖ over the whole vocabulary (the embedding module's output, scale included)."""

    median: float
    minimum: float
    maximum: float


@torch.no_grad()
def embedding_norms(parts: ModelParts, chunk_size: int = 8192) -> EmbeddingNorms:
    """Median, min and max L2 norm of ``parts.embed(t)`` over every token id ``t`` (in chunks)."""
    vocab = int(parts.embed.weight.shape[0])
    device = parts.embed.weight.device
    norms = torch.cat(
        [
            parts.embed(torch.arange(start, min(start + chunk_size, vocab), device=device)).float().norm(dim=-1).cpu()
            for start in range(0, vocab, chunk_size)
        ]
    )
    return EmbeddingNorms(float(norms.median()), float(norms.min()), float(norms.max()))


def typical_embedding_norm(parts: ModelParts) -> float:
    """The median L2 norm of the embedding module's output over the vocabulary: the soft tokens' norm."""
    return embedding_norms(parts).median


class EmbeddingAdapter(nn.Module):
    """E_A: w ``(n, d_w)`` → ``n_soft`` soft tokens ``(n, n_soft, d_model)``, each of norm ``target_norm``.

    An MLP ``d_w → hidden → n_soft·d_model`` (GELU) on standardised inputs, ``(w - mean) / scale`` (identity
    until :meth:`standardise_inputs` is called: residual states have a few huge dimensions that would
    otherwise dominate), then each soft token is rescaled: ``target_norm · v / ‖v‖``.
    """

    def __init__(
        self, d_w: int, d_model: int, target_norm: float, n_soft: int = 1, hidden: int = 1024, seed: int = 0
    ) -> None:
        super().__init__()
        if min(d_w, d_model, n_soft, hidden) < 1 or not target_norm > 0:
            raise ConfigError(
                f"ELM adapter sizes must be ≥ 1 and target_norm > 0; got d_w={d_w}, d_model={d_model}, "
                f"n_soft={n_soft}, hidden={hidden}, target_norm={target_norm}"
            )
        self.d_w, self.d_model, self.n_soft, self.hidden = d_w, d_model, n_soft, hidden
        self.target_norm, self.seed = float(target_norm), seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(d_w, hidden), nn.GELU(), nn.Linear(hidden, n_soft * d_model))
        self.register_buffer("input_mean", torch.zeros(d_w))
        self.register_buffer("input_scale", torch.ones(d_w))

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, d_w: int, n_soft: int = 1, hidden: int = 1024, seed: int = 0
    ) -> "EmbeddingAdapter":
        """An adapter into ``loaded``'s embedding space, its norm the model's typical token-embedding norm."""
        adapter = cls(d_w, loaded.d_model, typical_embedding_norm(loaded.parts), n_soft, hidden, seed)
        return adapter.to(loaded.device)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (saved with the weights)."""
        return {
            "d_w": self.d_w,
            "d_model": self.d_model,
            "target_norm": self.target_norm,
            "n_soft": self.n_soft,
            "hidden": self.hidden,
            "seed": self.seed,
        }

    @torch.no_grad()
    def standardise_inputs(self, embeddings: torch.Tensor) -> "EmbeddingAdapter":
        """Set the input standardisation to the per-dimension mean and std of ``embeddings`` ``(n, d_w)``."""
        values = embeddings.to(self.input_mean.device, torch.float32)
        self.input_mean.copy_(values.mean(0))
        if len(values) > 1:
            self.input_scale.copy_(values.std(0, correction=0).clamp_min(1e-6))
        return self

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Soft tokens ``(n, n_soft, d_model)`` of embeddings ``w`` ``(n, d_w)``, each of norm ``target_norm``."""
        x = (w.to(self.input_mean.device, torch.float32) - self.input_mean) / self.input_scale
        out = self.net(x).reshape(len(w), self.n_soft, self.d_model)
        return self.target_norm * functional.normalize(out, dim=-1)


# --------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class ElmExample:
    """One task example: row ``embedding_index`` of an embeddings tensor, a prompt with one placeholder, a target."""

    embedding_index: int
    prompt: str
    target: str

    def __post_init__(self) -> None:
        if self.prompt.count(EMBEDDING_PLACEHOLDER) != 1:
            raise ConfigError(
                f"an ELM prompt needs exactly one {EMBEDDING_PLACEHOLDER!r}; {self.prompt!r} has "
                f"{self.prompt.count(EMBEDDING_PLACEHOLDER)}"
            )


def make_examples(indices: Sequence[int], targets: Sequence[str], prompt: str) -> list[ElmExample]:
    """One example per (embedding row, target) pair, all with the same prompt template (one task)."""
    return [ElmExample(int(i), prompt, t) for i, t in zip(indices, targets, strict=True)]


def leading_tokens(tokenizer: Any, texts: Sequence[str], n_tokens: int) -> list[str]:
    """Reconstruction targets: each text's first ``n_tokens`` tokens, decoded, with a leading space.

    The space makes the target tokenise as the continuation of a prompt that ends in a word or colon.
    """
    targets = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
        targets.append(" " + tokenizer.decode(ids, skip_special_tokens=True).strip())
    return targets


# --------------------------------------------------------------------------------------------------
# Tokenising and batching


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of an example's pieces: before the placeholder (with BOS if any), after it, the target (+EOS)."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    target: tuple[int, ...]

    def row(self, n_soft: int | None) -> list[int]:
        """The ids of the prompt and target with ``n_soft`` soft slots (``None``: the placeholder removed)."""
        soft = [_SOFT] * n_soft if n_soft is not None else []
        return [*self.before, *soft, *self.after, *self.target]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS in front of plain text (e.g. Gemma's does, SmolLM2's does not)."""
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _piece_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a piece of text, with no special tokens (empty text: no ids)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_example(tokenizer: Any, prompt: str, target: str = "", end_with_eos: bool = True) -> EncodedExample:
    """Tokenise a prompt's pieces around the placeholder and the target, with no special tokens in between.

    ``end_with_eos`` appends the EOS to a non-empty target, so a trained ELM learns where to stop.
    """
    before, after = prompt.split(EMBEDDING_PLACEHOLDER) if EMBEDDING_PLACEHOLDER in prompt else (prompt, "")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    target_ids = _piece_ids(tokenizer, target)
    if target_ids and end_with_eos and tokenizer.eos_token_id is not None:
        target_ids.append(tokenizer.eos_token_id)
    return EncodedExample(
        tuple(bos + _piece_ids(tokenizer, before)), tuple(_piece_ids(tokenizer, after)), tuple(target_ids)
    )


def encode_examples(tokenizer: Any, examples: Sequence[ElmExample]) -> list[EncodedExample]:
    """:func:`encode_example` of every example (each distinct prompt and target tokenised once)."""
    cache: dict[tuple[str, str], EncodedExample] = {}
    encoded = []
    for example in examples:
        key = (example.prompt, example.target)
        if key not in cache:
            cache[key] = encode_example(tokenizer, example.prompt, example.target)
        encoded.append(cache[key])
    return encoded


def shuffled_rows(indices: Sequence[int], seed: int) -> list[int]:
    """A seeded derangement of embedding rows: index ``u`` → ``π(u)`` with ``π`` one cycle over the distinct rows.

    Examples sharing an embedding row move together, and no example keeps its own row (Sattolo's algorithm).
    """
    distinct = sorted(set(int(i) for i in indices))
    if len(distinct) < 2:
        raise ConfigError("the shuffled condition needs examples with at least two different embeddings")
    rng = np.random.default_rng(seed)
    cycle = list(range(len(distinct)))
    for i in range(len(cycle) - 1, 0, -1):
        j = int(rng.integers(0, i))
        cycle[i], cycle[j] = cycle[j], cycle[i]
    mapping = {distinct[k]: distinct[cycle[k]] for k in range(len(distinct))}
    return [mapping[int(i)] for i in indices]


def condition_rows(examples: Sequence[ElmExample], condition: str, seed: int = 0) -> list[int] | None:
    """The embedding row each example reads under ``condition`` (``None`` for ``none``: no soft token)."""
    if condition not in CONDITIONS:
        raise ConfigError(f"unknown ELM condition {condition!r}; use one of {', '.join(CONDITIONS)}")
    indices = [example.embedding_index for example in examples]
    if condition == "none":
        return None
    return indices if condition == "true" else shuffled_rows(indices, seed)


@dataclass
class ElmBatch:
    """Model inputs with the soft tokens spliced in, right-padded.

    Attributes:
        inputs_embeds: ``(B, T, d)``.
        attention_mask: ``(B, T)``, 1 on real positions.
        labels: ``(B, T)``, the token id at target positions and ``IGNORE_INDEX`` elsewhere (HF convention:
            position ``t`` is predicted from position ``t - 1``).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def _pad_id(tokenizer: Any) -> int:
    """The id used for padding (never attended to)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _embed_rows(
    loaded: LoadedModel, rows: Sequence[Sequence[int]], soft: torch.Tensor | None, left_pad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed padded rows of ids and put ``soft`` ``(B, n_soft, d)`` at their ``_SOFT`` slots, in order.

    Returns ``inputs_embeds`` ``(B, T, d)`` and ``attention_mask`` ``(B, T)``.
    """
    width = max(len(row) for row in rows)
    pad = _pad_id(loaded.tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = width - len(row) if left_pad else 0
        ids[r, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, start : start + len(row)] = 1
    slots = (ids == _SOFT).to(loaded.device)
    embeds = loaded.parts.embed(ids.masked_fill(ids == _SOFT, pad).to(loaded.device))
    n_slots = int(slots.sum())
    expected = 0 if soft is None else soft.shape[0] * soft.shape[1]
    if n_slots != expected:
        raise ValueError(f"{n_slots} soft-token slots in the batch but {expected} soft tokens given")
    if soft is not None:
        flat = soft.reshape(-1, soft.shape[-1]).to(embeds.dtype)
        placed = torch.zeros_like(embeds).index_put(tuple(slots.nonzero().T), flat)
        embeds = torch.where(slots[..., None], placed, embeds)
    return embeds, mask.to(loaded.device)


def build_batch(loaded: LoadedModel, encoded: Sequence[EncodedExample], soft: torch.Tensor | None) -> ElmBatch:
    """Right-padded inputs of ``encoded`` examples with ``soft`` ``(B, n_soft, d)`` at the placeholder.

    ``soft=None`` removes the placeholder (the ``none`` condition): every row is ``n_soft`` positions shorter.
    """
    n_soft = None if soft is None else soft.shape[1]
    rows = [example.row(n_soft) for example in encoded]
    embeds, mask = _embed_rows(loaded, rows, soft)
    labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.long)
    for r, (row, example) in enumerate(zip(rows, encoded, strict=True)):
        start = len(row) - len(example.target)
        labels[r, start : len(row)] = torch.tensor(example.target, dtype=torch.long)
    return ElmBatch(embeds, mask, labels.to(loaded.device))


def soft_tokens(
    adapter: EmbeddingAdapter | None, embeddings: torch.Tensor | None, rows: Sequence[int] | None
) -> torch.Tensor | None:
    """The adapter's soft tokens for the given rows of ``embeddings`` (``None`` when ``rows`` is ``None``)."""
    if rows is None:
        return None
    if adapter is None or embeddings is None:
        raise ValueError("soft tokens need both an adapter and embeddings")
    return adapter(embeddings[torch.as_tensor(list(rows), dtype=torch.long)])


def head_logits(loaded: LoadedModel, states: torch.Tensor) -> torch.Tensor:
    """Logits of post-final-norm states, with the final soft-capping of models that have one (Gemma 2)."""
    logits = loaded.parts.lm_head(states)
    cap = getattr(loaded.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def example_nll(loaded: LoadedModel, batch: ElmBatch) -> torch.Tensor:
    """Mean NLL (nats per token) of each row's target tokens ``(B,)``; the head reads only target positions."""
    output = loaded.parts.body(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=False)
    states = output[0]  # post-final-norm states (B, T, d)
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows, cols = scored.nonzero(as_tuple=True)
    logits = head_logits(loaded, states[:, :-1][rows, cols]).float()
    nll = functional.cross_entropy(logits, targets[rows, cols], reduction="none")
    totals = torch.zeros(len(targets), device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
    return totals / scored.sum(1).clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Training and evaluation


def example_order(n_examples: int, seed: int, step: int, batch_size: int) -> list[int]:
    """The examples of step ``step``: positions ``step·B … (step+1)·B`` of a seeded permutation per epoch."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    permutations = {
        epoch: np.random.default_rng([seed, epoch]).permutation(n_examples)
        for epoch in {p // n_examples for p in positions}
    }
    return [int(permutations[p // n_examples][p % n_examples]) for p in positions]


@contextmanager
def lm_trainable(loaded: LoadedModel, trainable: bool) -> Iterator[None]:
    """Set ``requires_grad`` of every LM parameter (eval mode throughout); restore the flags on exit."""
    flags = [p.requires_grad for p in loaded.model.parameters()]
    loaded.model.requires_grad_(trainable)
    loaded.model.eval()
    try:
        yield
    finally:
        for parameter, flag in zip(loaded.model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def adapter_optimiser(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter,
    lr: float,
    stage: int = 1,
    lm_lr: float | None = None,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW over the adapter (stage 1), or the adapter and the LM with its own ``lm_lr`` (stage 2)."""
    if stage not in (1, 2):
        raise ConfigError(f"ELM stage is {stage}; use 1 (adapter only) or 2 (adapter and LM)")
    groups: list[dict[str, Any]] = [{"params": list(adapter.parameters()), "lr": lr}]
    if stage == 2:
        if lm_lr is None:
            raise ConfigError("ELM stage 2 fine-tunes the LM and needs its own learning rate: set lm_lr")
        groups.append({"params": list(loaded.model.parameters()), "lr": lm_lr})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def training_step(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter,
    optimiser: torch.optim.Optimizer,
    embeddings: torch.Tensor,
    encoded: Sequence[EncodedExample],
    rows: Sequence[int],
    clip_grad_norm: float = 1.0,
) -> float:
    """One optimiser step on a batch: soft tokens, LM forward, backward, clipping, AdamW. Returns the loss."""
    batch = build_batch(loaded, encoded, soft_tokens(adapter, embeddings, rows))
    loss = example_nll(loaded, batch).mean()
    loss.backward()
    trained = [p for group in optimiser.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(trained, clip_grad_norm)
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_adapter(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter,
    embeddings: torch.Tensor,
    train_examples: Sequence[ElmExample],
    heldout_examples: Sequence[ElmExample],
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 50,
    stage: int = 1,
    lm_lr: float | None = None,
    progress: bool = True,
    weight_decay: float = 0.0,
    clip_grad_norm: float = 1.0,
) -> pl.DataFrame:
    """Train the adapter (stage 1) or the adapter and the LM (stage 2) on next-token CE of the targets.

    Stage 1 freezes every LM parameter (``requires_grad=False`` for the run, restored after): the backward
    pass reaches the soft tokens, not the LM's weights, and the LM's outputs on text without a soft token
    are unchanged bit for bit. Stage 2 updates the LM in place with ``lm_lr``: the base model then differs,
    the frozen-model checks no longer hold, and the LM must be saved with the adapter. The LM stays in eval
    mode (no dropout) in both. Step ``s`` reads the examples :func:`example_order` gives for ``(seed, s)``.

    Args:
        loaded: the LM.
        adapter: the adapter to train, in place (moved to the LM's device).
        embeddings: domain embeddings ``(N, d_w)``; examples index its rows.
        train_examples: the training examples.
        heldout_examples: examples scored (``true`` condition) at step 0, every ``eval_every`` steps and at the end.
        steps: optimiser steps.
        batch_size: examples per step.
        lr: AdamW learning rate of the adapter.
        seed: the example order's seed.
        eval_every: steps between held-out evaluations.
        stage: 1 (adapter only) or 2 (adapter and LM jointly).
        lm_lr: the LM's learning rate, stage 2 only.
        progress: show a progress bar.
        weight_decay: AdamW weight decay.
        clip_grad_norm: gradient-norm clipping over the trained parameters.

    Returns:
        One row per step (and step 0): ``step``, ``examples_seen``, ``train_loss`` (the batch's mean of
        per-example mean NLL, nats/token; null at step 0) and ``heldout_loss`` (the same over the held-out
        examples, on evaluation steps; null elsewhere).
    """
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ConfigError(f"ELM steps, batch_size, eval_every must be ≥ 1; got {steps}, {batch_size}, {eval_every}")
    if not train_examples:
        raise ConfigError("ELM training needs at least one training example")
    adapter.to(loaded.device)
    encoded = encode_examples(loaded.tokenizer, train_examples)
    optimiser = adapter_optimiser(loaded, adapter, lr, stage, lm_lr, weight_decay)

    def heldout() -> float | None:
        if not heldout_examples:
            return None
        losses = target_losses(loaded, adapter, embeddings, heldout_examples, "true", seed, batch_size)
        return float(losses.mean())

    rows: list[dict[str, Any]] = [{"step": 0, "examples_seen": 0, "train_loss": None, "heldout_loss": heldout()}]
    started = time.perf_counter()
    with lm_trainable(loaded, stage == 2):
        adapter.train()
        bar = tqdm(range(steps), disable=not progress, desc="ELM adapter")
        for step in bar:
            order = example_order(len(encoded), seed, step, batch_size)
            batch_rows = [train_examples[i].embedding_index for i in order]
            loss = training_step(
                loaded, adapter, optimiser, embeddings, [encoded[i] for i in order], batch_rows, clip_grad_norm
            )
            done = step + 1
            evaluate = done % eval_every == 0 or done == steps
            rows.append(
                {
                    "step": done,
                    "examples_seen": done * batch_size,
                    "train_loss": loss,
                    "heldout_loss": heldout() if evaluate else None,
                }
            )
            bar.set_postfix(loss=f"{loss:.3f}", seconds=f"{time.perf_counter() - started:.0f}")
    adapter.eval()
    return pl.DataFrame(rows, schema=LOSS_SCHEMA)


@torch.no_grad()
def target_losses(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter | None,
    embeddings: torch.Tensor | None,
    examples: Sequence[ElmExample],
    condition: str = "true",
    seed: int = 0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Per-example mean NLL (nats/token) of the target tokens under ``condition``, ``(len(examples),)`` on CPU.

    ``shuffled`` deranges the embeddings among ``examples`` (seeded, independent of ``batch_size``); ``none``
    removes the placeholder (``adapter`` and ``embeddings`` may then be ``None``).
    """
    rows = condition_rows(examples, condition, seed)
    encoded = encode_examples(loaded.tokenizer, examples)
    was_training = adapter.training if adapter is not None else False
    if adapter is not None:
        adapter.eval()
    losses = []
    for start in range(0, len(examples), batch_size):
        chunk = rows[start : start + batch_size] if rows is not None else None
        batch = build_batch(loaded, encoded[start : start + batch_size], soft_tokens(adapter, embeddings, chunk))
        losses.append(example_nll(loaded, batch).cpu())
    if adapter is not None:
        adapter.train(was_training)
    return torch.cat(losses) if losses else torch.zeros(0)


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class PromptInputs:
    """Left-padded prompt inputs for generation: ``inputs_embeds`` ``(B, T, d)``, mask and positions ``(B, T)``."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def _prompts(prompt: str | Sequence[str], n_rows: int) -> list[str]:
    """One prompt per row."""
    prompts = [prompt] * n_rows if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n_rows:
        raise ValueError(f"{len(prompts)} prompts for {n_rows} embeddings")
    return prompts


def prompt_inputs(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter | None,
    embeddings: torch.Tensor | None,
    prompts: Sequence[str],
) -> PromptInputs:
    """Left-padded prompts with the soft tokens of ``embeddings`` ``(B, d_w)`` (``None``: placeholder removed).

    Positions count real tokens only, so a padded row is computed as it would be alone.
    """
    encoded = [encode_example(loaded.tokenizer, p) for p in prompts]
    soft = None
    if embeddings is not None:
        if adapter is None:
            raise ValueError("generating from embeddings needs an adapter")
        soft = adapter(embeddings)
    rows = [e.row(None if soft is None else soft.shape[1]) for e in encoded]
    embeds, mask = _embed_rows(loaded, rows, soft, left_pad=True)
    return PromptInputs(embeds, mask, (mask.cumsum(1) - 1).clamp_min(0))


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Text of generated ids, cut before the first EOS."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _generate_batch(loaded: LoadedModel, inputs: PromptInputs, max_new_tokens: int) -> list[list[int]]:
    """Greedy ids for one batch with the KV cache; finished rows are fed EOS until every row is done."""
    eos = loaded.tokenizer.eos_token_id
    mask, positions = inputs.attention_mask, inputs.position_ids
    output = loaded.parts.body(
        inputs_embeds=inputs.inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True
    )
    finished = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = head_logits(loaded, output[0][:, -1]).argmax(-1)
        if eos is not None:
            token = token.masked_fill(finished, eos)
            finished |= token == eos
        tokens.append(token)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        output = loaded.parts.body(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=output.past_key_values,
            use_cache=True,
        )
    return torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(len(mask))]


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter | None,
    embeddings: torch.Tensor | None,
    prompt: str | Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of ``prompt`` with each embedding row as soft tokens, stopping at EOS per row.

    Args:
        loaded: the LM.
        adapter: the trained adapter (unused when ``embeddings`` is ``None``).
        embeddings: any points ``(n, d_w)`` (held-out, interpolated, moved along a direction), or ``None`` for
            the no-embedding condition (the placeholder removed).
        prompt: one prompt for every row, or one per row (rows are left-padded, positions per row).
        max_new_tokens: the most tokens generated per row.
        batch_size: rows per forward pass.

    Returns:
        One string per row (one for ``embeddings=None`` with a single prompt), without the EOS.
    """
    n_rows = len(embeddings) if embeddings is not None else (1 if isinstance(prompt, str) else len(prompt))
    prompts = _prompts(prompt, n_rows)
    if adapter is not None:
        adapter.eval()
    texts = []
    for start in range(0, n_rows, batch_size):
        chunk = embeddings[start : start + batch_size].to(loaded.device) if embeddings is not None else None
        inputs = prompt_inputs(loaded, adapter, chunk, prompts[start : start + batch_size])
        texts += [_decode(loaded.tokenizer, ids) for ids in _generate_batch(loaded, inputs, max_new_tokens)]
    return texts


# --------------------------------------------------------------------------------------------------
# Saving and loading


def model_fingerprint(loaded: LoadedModel) -> str:
    """The model's weights hash from its manifest, else a hash of its input-embedding matrix."""
    recorded = loaded.manifest.get("weights_sha256")
    if recorded:
        return str(recorded)
    weight = loaded.parts.embed.weight.detach().to(torch.float32).cpu().numpy()
    return "embed:" + hashlib.sha256(weight.tobytes()).hexdigest()[:16]


def save_adapter(
    path: str | os.PathLike[str], adapter: EmbeddingAdapter, loaded: LoadedModel, meta: dict[str, Any] | None = None
) -> None:
    """Write the adapter's weights, constructor arguments, the model's d_model and fingerprint, and ``meta``.

    One file, written atomically. After stage 2 the LM differs from the fingerprinted base model: save it too.
    """
    record = {
        "adapter": adapter.config,
        "d_model": loaded.d_model,
        "model_fingerprint": model_fingerprint(loaded),
        "meta": meta or {},
    }
    state = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
    with atomic_output(path) as tmp:
        torch.save({"record": json.dumps(record, default=str), "state": state}, tmp)


def read_adapter_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What :func:`save_adapter` recorded: constructor arguments, ``d_model``, ``model_fingerprint``, ``meta``."""
    if not Path(path).is_file():
        raise LatentAtlasError(f"no ELM adapter at {path}; train it first (snakemake {path})")
    return json.loads(torch.load(path, weights_only=True, map_location="cpu")["record"])


def load_adapter(path: str | os.PathLike[str], loaded: LoadedModel) -> tuple[EmbeddingAdapter, dict[str, Any]]:
    """Load an adapter for ``loaded``, refusing one trained for another width or another model.

    Returns:
        The adapter (eval mode, on the model's device) and the ``meta`` saved with it.
    """
    saved = torch.load(path, weights_only=True, map_location="cpu") if Path(path).is_file() else None
    if saved is None:
        raise LatentAtlasError(f"no ELM adapter at {path}; train it first (snakemake {path})")
    record = json.loads(saved["record"])
    if record["d_model"] != loaded.d_model:
        raise LatentAtlasError(
            f"the ELM adapter in {path} makes soft tokens of width d_model={record['d_model']}, but this model "
            f"has d_model={loaded.d_model}; it was trained for another model: retrain it"
        )
    if record["model_fingerprint"] != model_fingerprint(loaded):
        raise LatentAtlasError(
            f"the ELM adapter in {path} was trained with another model (fingerprint {record['model_fingerprint']}, "
            f"this model's {model_fingerprint(loaded)}); retrain it"
        )
    adapter = EmbeddingAdapter(**record["adapter"])
    adapter.load_state_dict(saved["state"])
    return adapter.to(loaded.device).eval(), record["meta"]


# --------------------------------------------------------------------------------------------------
# Judge: semantic consistency


@torch.no_grad()
def mean_pooled_states(
    loaded: LoadedModel, texts: Sequence[str], layer: int, batch_size: int = 16, skip_first: bool = True
) -> torch.Tensor:
    """Mean over each text's tokens of ``resid.{layer}`` (``hidden_states[layer]``), padding masked out.

    ``skip_first`` leaves out position 0 (the BOS, or the first token: an attention sink with a huge norm
    that would dominate every cosine, METHODS §0.4) unless it is the only token. ``hidden_states[L]`` is
    post-final-norm (METHODS §0.2). Texts with no token give a row of NaN. Returns ``(n, d)`` float32 on CPU.
    """
    if not 0 <= layer <= loaded.n_layers:
        raise ConfigError(f"layer {layer} is outside 0..{loaded.n_layers} of this model")
    ids = [list(loaded.tokenizer(text)["input_ids"]) for text in texts]
    pooled = torch.full((len(texts), loaded.d_model), float("nan"))
    present = [i for i, row in enumerate(ids) if row]
    for start in range(0, len(present), batch_size):
        chosen = present[start : start + batch_size]
        rows = [ids[i] for i in chosen]
        embeds, mask = _embed_rows(loaded, rows, None)
        states = loaded.parts.body(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        weights = mask.float()
        if skip_first:
            weights[:, 0] = torch.where(mask.sum(1) > 1, 0.0, weights[:, 0])
        hidden = states.hidden_states[layer].float()
        means = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        pooled[chosen] = means.cpu()
    return pooled


def semantic_consistency(generated_vectors: torch.Tensor, reference_vectors: torch.Tensor) -> torch.Tensor:
    """Cosine between each generated text's judge vector and its reference's, ``(n,)`` (NaN for NaN rows)."""
    if generated_vectors.shape != reference_vectors.shape:
        raise ValueError(f"shapes differ: {tuple(generated_vectors.shape)} vs {tuple(reference_vectors.shape)}")
    return functional.cosine_similarity(generated_vectors.double(), reference_vectors.double(), dim=-1)
