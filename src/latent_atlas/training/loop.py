"""Training a small Llama-architecture causal LM from scratch: a plain torch loop, resumable.

One :class:`Recipe` for every member of a family. The loop runs ``steps`` optimiser steps over packed
sequences (step ``i`` reads rows ``i·B … (i+1)·B`` of the member's training array, so the data a step sees
depends on nothing but the step), AdamW with a linear warm-up and a cosine decay to ``min_lr_ratio · lr``,
gradient-norm clipping, and a validation loss every ``eval_every`` steps and at the end.

Every ``checkpoint_every`` steps it writes ``last.pt`` atomically (a temporary file renamed over the old one):
model, optimiser, scheduler, torch RNG state, the loss log so far, and the fingerprint of the run (recipe
and data hashes). A run started again with the same fingerprint resumes from it; on the same device and
thread count the result is bit-identical to an uninterrupted run (tests check this on CPU).
"""

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm import tqdm

from latent_atlas.errors import ConfigError

CHECKPOINT = "last.pt"
LOSS_SCHEMA = {
    "step": pl.Int64,
    "tokens": pl.Int64,
    "lr": pl.Float64,
    "train_loss": pl.Float64,
    "grad_norm": pl.Float64,
    "validation_loss": pl.Float64,
    "seconds": pl.Float64,
}


@dataclass(frozen=True)
class Architecture:
    """A Llama-architecture decoder (RMSNorm, RoPE, SwiGLU), embeddings tied to the unembedding."""

    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 256
    sequence_length: int = 128
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for item in fields(self):
            if not getattr(self, item.name) > 0:
                raise ConfigError(f"training.architecture.{item.name} is {getattr(self, item.name)}; it must be > 0")
        if self.hidden_size % self.heads or (self.hidden_size // self.heads) % 2:
            raise ConfigError(
                f"training.architecture.hidden_size {self.hidden_size} must be a multiple of heads {self.heads} "
                "with an even head size (RoPE rotates pairs)"
            )


@dataclass(frozen=True)
class Optimiser:
    """AdamW with linear warm-up, cosine decay and gradient-norm clipping."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "clip_grad_norm": self.clip_grad_norm > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"training.optimiser.{key} is {getattr(self, key)}, out of range")


@dataclass(frozen=True)
class Recipe:
    """Everything but the data: architecture, budget, optimiser, seed and schedule of checkpoints."""

    architecture: Architecture
    optimiser: Optimiser
    tokens: int
    batch_size: int
    validation_sequences: int = 32
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 25

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(
                f"training.budget.tokens {self.tokens} is less than one batch "
                f"({self.batch_size} × {self.architecture.sequence_length} tokens): raise it"
            )
        for key in ("batch_size", "validation_sequences", "checkpoint_every", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key} is {getattr(self, key)}; it must be ≥ 1")

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimiser step."""
        return self.batch_size * self.architecture.sequence_length

    @property
    def steps(self) -> int:
        """Optimiser steps: whole batches within the token budget."""
        return self.tokens // self.tokens_per_step

    @property
    def train_sequences(self) -> int:
        """Training sequences the run reads, each once."""
        return self.steps * self.batch_size

    @property
    def warmup_steps(self) -> int:
        """Steps of linear warm-up."""
        return round(self.optimiser.warmup_fraction * self.steps)


def parse_recipe(training: Mapping[str, Any]) -> Recipe:
    """The recipe of the config's ``training`` section (see the config schema for every key)."""
    budget = training.get("budget", {})
    return Recipe(
        architecture=Architecture(**training.get("architecture", {})),
        optimiser=Optimiser(**training.get("optimiser", {})),
        tokens=int(budget["tokens"]),
        batch_size=int(budget.get("batch_size", 16)),
        validation_sequences=int(budget.get("validation_sequences", 32)),
        seed=int(training.get("seed", 0)),
        checkpoint_every=int(training.get("checkpoint_every", 50)),
        eval_every=int(training.get("eval_every", 25)),
    )


def build_model(architecture: Architecture, tokenizer: Any, seed: int) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` for the tokenizer's vocabulary (same seed → same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=architecture.hidden_size,
        intermediate_size=architecture.intermediate_size,
        num_hidden_layers=architecture.layers,
        num_attention_heads=architecture.heads,
        num_key_value_heads=architecture.heads,
        max_position_embeddings=architecture.sequence_length,
        rope_theta=architecture.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=separator,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def learning_rate_factor(step: int, recipe: Recipe) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine from 1 to ``min_lr_ratio``."""
    warmup, total, floor = recipe.warmup_steps, recipe.steps, recipe.optimiser.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimiser(model: nn.Module, settings: Optimiser) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms' gains and biases do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps)


@torch.no_grad()
def validation_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of the validation sequences."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class TrainingResult:
    """A trained model and its record."""

    model: nn.Module
    losses: pl.DataFrame
    tokens_seen: int
    final_validation_loss: float
    resumed_from: int | None


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a reader sees the old one or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _load_checkpoint(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this run (same fingerprint), else ``None``."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state if state.get("fingerprint") == dict(fingerprint) else None


def train(
    model: nn.Module,
    train_sequences: np.ndarray,
    validation_sequences: np.ndarray,
    recipe: Recipe,
    checkpoint_dir: str | Path,
    fingerprint: Mapping[str, Any],
    device: torch.device | str = "cpu",
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
) -> TrainingResult:
    """Train ``model`` on ``train_sequences`` (``steps × batch_size`` rows of ``sequence_length`` ids).

    Resumes from ``checkpoint_dir/last.pt`` when its fingerprint equals ``fingerprint`` (a checkpoint of
    another run is ignored, and overwritten at the next checkpoint). ``after_step(step)`` is called after
    each completed step (and its checkpoint, if one was due): tests raise from it to simulate a kill.
    """
    expected = (recipe.train_sequences, recipe.architecture.sequence_length)
    if train_sequences.shape != expected:
        raise ValueError(f"training sequences have shape {train_sequences.shape}; the recipe needs {expected}")
    device = torch.device(device)
    model.to(device).train()
    optimiser = _optimiser(model, recipe.optimiser)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: learning_rate_factor(step, recipe))
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT
    rows: list[dict[str, Any]] = []
    start, resumed_from = 0, None
    state = _load_checkpoint(checkpoint_path, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        rows, start = list(state["losses"]), int(state["step"])
        resumed_from = start
    data = torch.from_numpy(train_sequences)
    validation = torch.from_numpy(validation_sequences).to(device)
    batch = recipe.batch_size
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, disable=not progress, desc="train")
    started = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    for step in bar:
        inputs = data[step * batch : (step + 1) * batch].to(device)
        loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optimiser.clip_grad_norm)
        lr = optimiser.param_groups[0]["lr"]
        optimiser.step()
        scheduler.step()
        optimiser.zero_grad(set_to_none=True)
        done = step + 1
        evaluate = done % recipe.eval_every == 0 or done == recipe.steps
        rows.append(
            {
                "step": done,
                "tokens": done * recipe.tokens_per_step,
                "lr": lr,
                "train_loss": float(loss.detach()),
                "grad_norm": float(grad_norm),
                "validation_loss": validation_loss(model, validation, batch) if evaluate else None,
                "seconds": time.perf_counter() - started,
            }
        )
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if done % recipe.checkpoint_every == 0 or done == recipe.steps:
            _save_checkpoint(
                checkpoint_path,
                {
                    "fingerprint": dict(fingerprint),
                    "step": done,
                    "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "losses": rows,
                },
            )
        if after_step is not None:
            after_step(done)
    losses = pl.DataFrame(rows, schema=LOSS_SCHEMA)
    final = losses.filter(pl.col("validation_loss").is_not_null())["validation_loss"]
    return TrainingResult(
        model.eval(),
        losses,
        tokens_seen=recipe.steps * recipe.tokens_per_step,
        final_validation_loss=float(final[-1]) if len(final) else float("nan"),
        resumed_from=resumed_from,
    )


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for manifests), with the derived step counts."""
    return asdict(recipe) | {"steps": recipe.steps, "tokens_per_step": recipe.tokens_per_step}
