"""The tuned lens (Belrose et al. 2023; METHODS §2): per-layer affine translators, then the unembedding.

TL_l(h) = U(h + A_l h + b_l) with A_l = 0, b_l = 0 at initialisation, so an untrained tuned lens is the
logit lens exactly. Translators are trained on stored activations (no forward passes of the model) to
minimise KL(p_final || softmax(TL_l(h_l))) with the published recipe: SGD with Nesterov momentum 0.9,
lr = lr_scale * (1 - 0.9), weight decay 1e-3, linear decay to 0, gradient-norm clip 1.0.

Held-out stopping (``validation_tokens`` > 0): a slice of the training split's documents is kept out of
training, and every ``eval_every`` steps the mean KL over trained layers is measured there; with ``patience``
> 0, training stops once that KL has not fallen by more than ``min_improvement`` (relative) for ``patience``
evaluations in a row. The published recipe runs a fixed 250 steps; stopping on a held-out plateau is how a
budget-limited run shows it trained long enough (the curve and the tokens it took are saved with the lens).
"""

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from latent_atlas.errors import LatentAtlasError
from latent_atlas.lenses.base import Lens, Readout, Unembed
from latent_atlas.lenses.streaming import single_threaded
from latent_atlas.provenance import atomic_output


class TunedLens(Lens):
    """A logit lens with a residual affine translator for each layer 0..L-1 (layer L is the identity)."""

    name = "tuned"

    def __init__(self, unembed: Unembed, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.unembed = unembed
        self.n_layers, self.d_model = n_layers, d_model
        device = unembed.weight.device
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model, device=device) for _ in range(n_layers))
        for translator in self.translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)
        self.trained_layers: list[int] = []

    def reads(self, layer: int) -> bool:
        """Only the layers it was trained for, and the last layer (where it is the identity)."""
        return layer >= self.n_layers or layer in self.trained_layers

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Translate a state: h + A_l h + b_l (the identity at the last layer)."""
        if layer >= self.n_layers:
            return h
        return h + self.translators[layer](h)

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The unembedding of the translated state."""
        return self.unembed(self.transform(h, layer))

    def readout(self, layer: int) -> Readout | None:
        """The model's head, the same at every layer."""
        return self.unembed.readout()

    def hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The translated state through the final norm."""
        return self.unembed.final_norm(self.transform(h, layer))

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """Write the translators and their config (with the unembedding's fingerprint) to one file, atomically."""
        config = {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "trained_layers": self.trained_layers,
            "unembed_fingerprint": self.unembed.fingerprint(),
            **(extra or {}),
        }
        with atomic_output(path) as tmp:
            torch.save({"config": json.dumps(config, default=str), "translators": self.translators.state_dict()}, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str], unembed: Unembed) -> "TunedLens":
        """Load a saved lens; fails if it is missing or was trained against a different unembedding."""
        if not Path(path).is_file():
            raise LatentAtlasError(f"no tuned lens at {path}; train it with `snakemake {path}`")
        saved = torch.load(path, weights_only=True, map_location=unembed.weight.device)
        config = json.loads(saved["config"])
        if config["unembed_fingerprint"] != unembed.fingerprint():
            raise LatentAtlasError(
                f"the tuned lens in {path} was trained for another model (unembedding fingerprint "
                f"{config['unembed_fingerprint']}, this model's {unembed.fingerprint()}); retrain it"
            )
        lens = cls(unembed, config["n_layers"], config["d_model"])
        lens.translators.load_state_dict(saved["translators"])
        lens.trained_layers = list(config["trained_layers"])
        return lens

    @staticmethod
    def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The config saved with a lens (training settings, losses, provenance)."""
        return json.loads(torch.load(path, weights_only=True)["config"])


@dataclass(frozen=True)
class TunedLensTraining:
    """Training budget and the published optimiser recipe (``lenses.tuned`` in config)."""

    steps: int = 250
    tokens_per_step: int = 256
    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip_grad_norm: float = 1.0
    seed: int = 0
    validation_tokens: int = 0
    eval_every: int = 25
    patience: int = 0
    min_improvement: float = 0.01


def kl_to_target(target_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_target || softmax(logits)), in nats."""
    log_probs = functional.log_softmax(logits.float(), dim=-1)
    return (target_log_probs.exp() * (target_log_probs - log_probs)).sum(-1).mean()


@dataclass(frozen=True)
class TargetDistribution:
    """The model's final distribution p for a batch of tokens: computed once per batch, shared by every layer."""

    probs: torch.Tensor  # (n, V)
    mass: torch.Tensor  # (n,): sum_v p_v (1 up to rounding)
    neg_entropy: torch.Tensor  # (n,): sum_v p_v log p_v

    @classmethod
    def of(cls, unembed: Unembed, final_states: torch.Tensor) -> "TargetDistribution":
        """From post-final-norm states ``(n, d)`` through the model's head."""
        log_probs = functional.log_softmax(unembed.lm_head(final_states).float(), dim=-1)
        probs = log_probs.exp()
        return cls(probs, probs.sum(-1), (probs * log_probs).sum(-1))

    def rows(self, start: int, stop: int) -> "TargetDistribution":
        """The rows ``start:stop``."""
        return TargetDistribution(self.probs[start:stop], self.mass[start:stop], self.neg_entropy[start:stop])


def lens_kl(lens: Lens, states: torch.Tensor, layer: int, target: TargetDistribution) -> torch.Tensor:
    """Mean over rows of KL(p || lens), differentiable: :func:`fused_kl` where the lens has a readout."""
    readout = lens.readout(layer)
    if readout is None:
        log_probs = functional.log_softmax(lens.logits(states, layer).float(), dim=-1)
        return (target.neg_entropy - (target.probs * log_probs).sum(-1)).mean()
    return fused_kl(lens.hidden(states, layer), readout, target)


def fused_kl(hidden: torch.Tensor, readout: Readout, target: TargetDistribution, slab: int = 16) -> torch.Tensor:
    """Mean over rows of KL(p || softmax(readout(hidden))), with its gradient taken in the same pass.

    With z the logits, ``KL = sum p log p - sum p z + mass * logsumexp z`` and ``dKL/dz = mass * softmax(z) - p``:
    the product ``hidden @ W^T`` is computed once; then ``slab`` rows at a time (in cache, on one thread: see
    :mod:`latent_atlas.lenses.streaming`) the log-sum-exp, the KL and the gradient overwrite it in place; one
    product with ``W`` gives the gradient of ``hidden``. Autograd keeps only that ``(n, d)`` gradient, none of
    the ``(n, V)`` intermediates of a log-softmax.
    """
    return _FusedKL.apply(hidden, readout, target, slab)


class _FusedKL(torch.autograd.Function):
    """:func:`fused_kl`: the gradient of ``hidden`` is computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, readout: Readout, target: TargetDistribution, slab: int
    ) -> torch.Tensor:
        """The mean KL; saves ``d mean KL / d hidden`` when it is needed."""
        want_grad = ctx.needs_input_grad[0]
        product = readout.product(hidden.float())
        kl = torch.empty(len(product))
        with single_threaded():  # in-cache passes on one thread; the products use the caller's threads
            for start in range(0, len(product), slab):
                rows = slice(start, start + slab)
                kl[rows] = _slab_kl(product[rows], readout, target.rows(start, start + slab), want_grad)
        if want_grad:
            ctx.save_for_backward(product.mm(readout.weight).div_(len(product)))  # product now holds dKL/dz
        return kl.mean()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """The saved gradient times the upstream one."""
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def _slab_kl(product: torch.Tensor, readout: Readout, target: TargetDistribution, want_grad: bool) -> torch.Tensor:
    """KL of a few rows of raw products ``(r, V)``; with ``want_grad``, dKL/d product is written over them."""
    logits = readout.finish(product)  # the product itself, unless the model transforms its logits
    slope = readout.slope(logits) if want_grad else 1.0
    top = logits.amax(1, keepdim=True)
    shifted = logits.sub_(top)
    exp = torch.exp(shifted)
    total = exp.sum(1)
    kl = target.neg_entropy - (target.probs * shifted).sum(1) + total.log() * target.mass
    if want_grad:
        grad = exp.mul_((target.mass / total)[:, None]).sub_(target.probs)
        torch.mul(grad, slope, out=product)
    return kl


@dataclass(frozen=True)
class TrainingBatch:
    """One optimiser step's data: states of each trained layer and the post-norm states of the same tokens."""

    states: dict[int, torch.Tensor]
    final: torch.Tensor


def hold_out_documents(rows: np.ndarray, docs: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split rows by document into (training, validation), both sorted.

    Whole documents, in an order shuffled by ``seed``, move to validation until it holds at least ``count`` rows;
    at least one document always stays for training.
    """
    names = np.unique(docs)
    order = np.random.default_rng(seed).permutation(names)
    sizes = np.array([int((docs == name).sum()) for name in order])
    taken = int(np.searchsorted(np.cumsum(sizes), count)) + 1
    held = np.isin(docs, order[: min(taken, len(order) - 1)])
    return np.sort(rows[~held]), np.sort(rows[held])


def sampled_batches(
    states: Callable[[int], torch.Tensor],
    final_states: torch.Tensor,
    layers: Sequence[int],
    settings: TunedLensTraining,
) -> Iterator[TrainingBatch]:
    """Batches of ``tokens_per_step`` random rows of in-memory training states (read once from the store)."""
    data = {layer: states(layer) for layer in layers}
    generator = np.random.default_rng(settings.seed)
    n_tokens = final_states.shape[0]
    for _ in range(settings.steps):
        rows = torch.from_numpy(generator.choice(n_tokens, size=min(settings.tokens_per_step, n_tokens), replace=False))
        yield TrainingBatch({layer: values[rows] for layer, values in data.items()}, final_states[rows])


@torch.no_grad()
def held_out_kl(lens: TunedLens, batch: TrainingBatch, layers: Sequence[int], rows: int = 1024) -> float:
    """Mean over ``layers`` of the lens's KL to the model's final distribution on a held-out batch."""
    total = 0.0
    for start in range(0, batch.final.shape[0], rows):
        target = TargetDistribution.of(lens.unembed, batch.final[start : start + rows])
        for layer in layers:
            kl = lens_kl(lens, batch.states[layer][start : start + rows], layer, target)
            total += float(kl) * len(target.mass)
    return total / (batch.final.shape[0] * max(len(layers), 1))


@dataclass
class HeldOutStopping:
    """Held-out KL every ``eval_every`` steps; ``stop`` once it has plateaued for ``patience`` evaluations."""

    batch: TrainingBatch
    eval_every: int
    patience: int
    min_improvement: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    best: float = math.inf
    stale: int = 0

    def after_step(self, lens: TunedLens, layers: Sequence[int], step: int, last: bool) -> bool:
        """Measure when due (and after the last step); True when training should stop."""
        if (step + 1) % self.eval_every and not last:
            return False
        kl = held_out_kl(lens, self.batch, layers)
        self.curve.append((step + 1, kl))
        if kl < self.best * (1 - self.min_improvement):
            self.best, self.stale = kl, 0
        else:
            self.best, self.stale = min(self.best, kl), self.stale + 1
        return self.patience > 0 and self.stale >= self.patience


def train_tuned_lens(
    lens: TunedLens,
    batches: Iterable[TrainingBatch],
    layers: Sequence[int],
    settings: TunedLensTraining,
    on_step: Callable[[int, float], None] | None = None,
    stopping: HeldOutStopping | None = None,
) -> list[float]:
    """Train the translators of ``layers`` to match the model's final distribution.

    Args:
        lens: the lens to train (translators of other layers are left untouched).
        batches: one :class:`TrainingBatch` per step (``settings.steps`` of them), e.g. from
            :func:`sampled_batches` over stored states, or from forward passes of the model.
        layers: layers to train (each < ``lens.n_layers``).
        settings: the optimiser recipe and the number of steps (for the linear decay).
        on_step: called with (step, mean KL over layers) after each step.
        stopping: held-out KL measured as it trains (its ``curve``), and the stop once it plateaus.

    Returns:
        The mean KL over layers at each step run.
    """
    layers = [layer for layer in layers if layer < lens.n_layers]
    parameters = [p for layer in layers for p in lens.translators[layer].parameters()]
    optimiser = torch.optim.SGD(
        parameters,
        lr=settings.lr_scale * (1 - settings.momentum),
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / settings.steps)
    losses = []
    for step, batch in enumerate(batches):
        with torch.no_grad():
            target = TargetDistribution.of(lens.unembed, batch.final)  # once per batch, shared by every layer
        optimiser.zero_grad(set_to_none=True)
        step_loss = 0.0
        for layer in layers:  # one backward per layer bounds memory to one layer's logits
            loss = lens_kl(lens, batch.states[layer], layer, target)
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(parameters, settings.clip_grad_norm)
        optimiser.step()
        schedule.step()
        losses.append(step_loss / max(len(layers), 1))
        if on_step is not None:
            on_step(step, losses[-1])
        if not math.isfinite(losses[-1]):
            raise LatentAtlasError(f"tuned-lens training diverged at step {step}; lower lenses.tuned.lr_scale")
        if stopping is not None and stopping.after_step(lens, layers, step, last=step + 1 == settings.steps):
            break
    lens.trained_layers = sorted(set(lens.trained_layers) | set(layers))
    return losses


def training_settings(section: dict[str, Any]) -> TunedLensTraining:
    """Build training settings from config, ignoring keys it does not use."""
    known = set(asdict(TunedLensTraining()))
    return TunedLensTraining(**{k: v for k, v in section.items() if k in known})
