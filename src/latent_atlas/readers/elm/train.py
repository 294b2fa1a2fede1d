"""Training the ELM adapter (stage 1; stage 2 also the LM) and its losses under the evaluation conditions."""

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from latent_atlas.errors import ConfigError
from latent_atlas.models import LoadedModel
from latent_atlas.readers.elm.adapter import EmbeddingAdapter
from latent_atlas.readers.elm.batching import (
    ElmExample,
    EncodedExample,
    build_batch,
    condition_rows,
    encode_examples,
    example_nll,
    soft_tokens,
)

LOSS_SCHEMA = {
    "step": pl.Int64,
    "examples_seen": pl.Int64,
    "train_loss": pl.Float64,
    "heldout_loss": pl.Float64,
}


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
