"""BERT-flow (METHODS §8.4): a Glow-style normalising flow that maps sentence states to z ≈ N(0, I).

Li, Zhou, He, Wang, Yang & Li, "On the Sentence Embeddings from Pre-trained Language Models", EMNLP 2020.
An invertible map f (data → latent) is fitted by maximum likelihood, log p(u) = log N(f(u); 0, I) +
log |det ∂f/∂u|, on unlabelled pooled sentence states u (one row per sentence, as Li et al.: the LM is
frozen and only the flow learns); z = f(u) then replaces u before cosine similarity.

Layers, data → latent, all float64 on the CPU:

1. an invertible linear map z = (x − shift) @ W, initialised to the regularised whitening transform of the
   fitting set (METHODS §8.5; eigenvalues Λ + ε·mean(Λ) so that n < d stays invertible). ``shift`` is a fixed
   buffer (the fitting-set mean); W = W_white @ V with W_white fixed and V learnable, initialised to I, so
   that Adam's steps are in whitened units whatever the scale of the states;
2. K affine couplings (RealNVP / Glow), each after a fixed seeded permutation: (log s, t) = MLP(a),
   y_b = b · exp(log s) + t with log s = L · tanh(raw / L) bounded. The coupling writes its output back in
   the input's order (the permutation only picks the halves) and the MLP's last layer is zero-initialised,
   so an untrained flow *is* the whitening transform, coordinate for coordinate (the whitening start is
   ours: Li et al.'s Glow does not start from it).

With few points per dimension (e.g. a few thousand sentences in 768-d) the whitening initialisation
dominates: the couplings have little to learn from and the result stays close to whitening.
"""

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from latent_atlas.geometry.metrics import Moments, principal_axes, whitening_floor

_DTYPE = torch.float64
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class FlowSettings:
    """How to build and train a flow (Li et al.'s learning rate; early stopping on held-back sentences)."""

    couplings: int = 4
    hidden: int = 256
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    scale_limit: float = 2.0
    epsilon: float = 1e-6
    validation_fraction: float = 0.1
    patience: int = 2

    def __post_init__(self) -> None:
        minimum = {"couplings": 0, "hidden": 1, "epochs": 0, "batch_size": 1, "patience": 1}
        for name, lowest in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"flow setting {name} must be an integer >= {lowest}, got {value!r}")
        for name in ("learning_rate", "scale_limit", "epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"flow setting {name} must be a positive number, got {value!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"flow setting validation_fraction must lie in [0, 1), got {self.validation_fraction!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "FlowSettings":
        """Build from a config mapping; an unknown key is an error naming it and the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = [key for key in section if key not in valid]
        if unknown:
            raise ValueError(f"unknown flow setting {unknown[0]!r}; valid settings are {', '.join(valid)}")
        return cls(**section)


def _whitening(states: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, eigenvectors U and log scales −½ log(Λ + ε·mean(Λ)) of ``states`` ``(n, d)``, Λ descending."""
    moments = Moments.of(states)
    eigenvalues, eigenvectors = principal_axes(moments.covariance)
    if not eigenvalues.mean() > 0:
        raise ValueError("the states have zero variance: there is nothing to whiten")
    return moments.mean, eigenvectors, -0.5 * np.log(eigenvalues + whitening_floor(eigenvalues, epsilon))


class _InvertibleLinear(nn.Module):
    """z = (x − shift) @ W_white @ V: fixed whitening (U diag(exp(log_scale))) then a learnable V (init I)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim, dtype=_DTYPE))
        self.register_buffer("basis", torch.eye(dim, dtype=_DTYPE))
        self.register_buffer("log_scale", torch.zeros(dim, dtype=_DTYPE))
        self.learned = nn.Parameter(torch.eye(dim, dtype=_DTYPE))

    def initialise(self, states: np.ndarray, epsilon: float) -> None:
        """Set shift and W_white to the regularised whitening of ``states``; reset V to I."""
        with torch.no_grad():
            for name, value in zip(("shift", "basis", "log_scale"), _whitening(states, epsilon), strict=True):
                getattr(self, name).copy_(torch.from_numpy(value))
            self.learned.copy_(torch.eye(len(self.shift), dtype=_DTYPE))

    @property
    def weight(self) -> torch.Tensor:
        """The whole matrix W ``(d, d)``."""
        return (self.basis * self.log_scale.exp()) @ self.learned

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = ((x - self.shift) @ self.basis * self.log_scale.exp()) @ self.learned
        logdet = self.log_scale.sum() + torch.linalg.slogdet(self.learned)[1]
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        whitened = torch.linalg.solve(self.learned, z, left=False)
        return (whitened * (-self.log_scale).exp()) @ self.basis.T + self.shift


class _AffineCoupling(nn.Module):
    """y_b = b · exp(log s) + t with (log s, t) = MLP(a); a passes unchanged.

    A fixed random permutation picks which dimensions form a and b; the output keeps the input's order, so a
    zero-initialised coupling is exactly the identity.
    """

    def __init__(self, dim: int, hidden: int, scale_limit: float, generator: torch.Generator) -> None:
        super().__init__()
        permutation = torch.randperm(dim, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))
        self.sizes = [dim // 2, dim - dim // 2]
        self.scale_limit = scale_limit
        self.net = nn.Sequential(
            nn.Linear(self.sizes[0], hidden, dtype=_DTYPE),
            nn.GELU(),
            nn.Linear(hidden, 2 * self.sizes[1], dtype=_DTYPE),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_and_shift(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = self.net(a).chunk(2, dim=-1)
        return self.scale_limit * torch.tanh(raw / self.scale_limit), shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, self.permutation].split(self.sizes, dim=-1)
        log_scale, shift = self._scale_and_shift(a)
        y = torch.cat([a, b * log_scale.exp() + shift], dim=-1)
        return y[:, self.inverse_permutation], log_scale.sum(-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, y_b = y[:, self.permutation].split(self.sizes, dim=-1)
        log_scale, shift = self._scale_and_shift(a)
        return torch.cat([a, (y_b - shift) * (-log_scale).exp()], dim=-1)[:, self.inverse_permutation]


class GaussianisingFlow(nn.Module):
    """Invertible linear layer then ``couplings`` affine couplings; float64; data → latent is ``forward``.

    Construction is deterministic for a given ``seed`` (permutations, MLP weights) and leaves torch's global
    random state as it was. Until :meth:`initialise` is called the linear layer is the identity.
    """

    def __init__(
        self, dim: int, couplings: int = 4, hidden: int = 256, scale_limit: float = 2.0, seed: int = 0
    ) -> None:
        if dim < 2:
            raise ValueError(f"a coupling flow needs at least 2 dimensions, got {dim}")
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = _InvertibleLinear(dim)
            self.couplings = nn.ModuleList(
                _AffineCoupling(dim, hidden, scale_limit, generator) for _ in range(couplings)
            )

    @property
    def dim(self) -> int:
        """Dimension d of the states."""
        return len(self.linear.shift)

    def initialise(self, states: np.ndarray, epsilon: float = 1e-6) -> "GaussianisingFlow":
        """Set the linear layer to the regularised whitening of ``states`` ``(n, d)``; returns ``self``."""
        self.linear.initialise(np.asarray(states, dtype=np.float64), epsilon)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map data ``(n, d)`` to latents z ``(n, d)`` and log |det ∂z/∂x| per row ``(n,)``."""
        z, logdet = self.linear(x)
        for coupling in self.couplings:
            z, coupling_logdet = coupling(z)
            logdet = logdet + coupling_logdet
        return z, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Map latents ``(n, d)`` back to data ``(n, d)``."""
        for coupling in reversed(self.couplings):
            z = coupling.inverse(z)
        return self.linear.inverse(z)


def log_likelihood(flow: GaussianisingFlow, x: torch.Tensor) -> torch.Tensor:
    """The log-likelihood log N(f(x); 0, I) + log |det ∂f/∂x| per row of ``x`` ``(n, d)``, in nats, shape ``(n,)``."""
    z, logdet = flow(x)
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * _LOG_2PI) + logdet


def _fitting_states(states: np.ndarray) -> np.ndarray:
    """``states`` as float64 ``(n, d)``, checked: 2-D, at least 2 rows, finite."""
    x = np.asarray(states, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"a flow is fitted on states of shape (n, d), got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"fitting a flow needs at least 2 rows of states, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"the states contain {int((~np.isfinite(x)).sum())} non-finite values (NaN or inf)")
    return x


def build_flow(states: np.ndarray, settings: FlowSettings, seed: int = 0) -> GaussianisingFlow:
    """An untrained flow on ``states`` ``(n, d)``: exactly their regularised whitening transform."""
    x = _fitting_states(states)
    flow = GaussianisingFlow(x.shape[1], settings.couplings, settings.hidden, settings.scale_limit, seed)
    return flow.initialise(x, settings.epsilon)


def _step(flow: GaussianisingFlow, optimiser: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One Adam step on the negative log-likelihood per dimension (nats); returns the loss."""
    loss = -log_likelihood(flow, batch).mean() / batch.shape[1]
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return loss.item()


def _validation_loss(flow: GaussianisingFlow, x: torch.Tensor) -> float:
    """Negative log-likelihood per dimension (nats) of held-back rows."""
    with torch.no_grad():
        return float(-log_likelihood(flow, x).mean() / x.shape[1])


def _train(
    flow: GaussianisingFlow, x: torch.Tensor, held: torch.Tensor, settings: FlowSettings, seed: int
) -> tuple[list[float], list[float], int]:
    """Minibatch Adam over seeded shuffles of ``x``, keeping the epoch with the best loss on ``held``.

    Returns the mean training loss per epoch, the held-back loss after each epoch (index 0: before
    training, i.e. plain whitening) and the epoch kept. Training stops after ``patience`` epochs without
    improvement; with no held-back rows every epoch is trained and the last is kept.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(flow.parameters(), lr=settings.learning_rate)
    losses: list[float] = []
    held_losses = [_validation_loss(flow, held)] if len(held) else []
    best_epoch, best_state = 0, copy.deepcopy(flow.state_dict())
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        loss = float(np.mean([_step(flow, optimiser, x[batch]) for batch in order.split(settings.batch_size)]))
        if not math.isfinite(loss):
            raise RuntimeError(f"flow training diverged at epoch {epoch} (loss {loss}); lower learning_rate")
        losses.append(loss)
        if not len(held):
            best_epoch = epoch
            continue
        held_losses.append(_validation_loss(flow, held))
        if held_losses[-1] < held_losses[best_epoch]:
            best_epoch, best_state = epoch, copy.deepcopy(flow.state_dict())
        elif epoch - best_epoch >= settings.patience:
            break
    if len(held):
        flow.load_state_dict(best_state)
    return losses, held_losses, best_epoch


def _split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fitting, held-back) row indices; nothing held back when the fraction is 0 or n < 10."""
    if fraction == 0 or n < 10:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, round(fraction * n))
    return np.sort(order[cut:]), np.sort(order[:cut])


def fit_flow(states: np.ndarray, settings: FlowSettings, seed: int = 0) -> "FittedFlow":
    """Fit a flow on pooled sentence states ``(n, d)`` by maximum likelihood; deterministic for a ``seed``.

    A ``validation_fraction`` of the rows is held back: the whitening initialisation and the training use
    the rest, and the epoch (0 = whitening alone) with the best held-back likelihood is kept, so that with
    few sentences per dimension the flow does not end worse than whitening on text it has not seen.
    """
    x = _fitting_states(states)
    fitting, held = _split_rows(len(x), settings.validation_fraction, seed)
    flow = build_flow(x[fitting], settings, seed)
    losses, held_losses, best = _train(flow, torch.tensor(x[fitting]), torch.tensor(x[held]), settings, seed)
    flow.eval().requires_grad_(False)
    return FittedFlow(flow, losses, held_losses, best)


@dataclass(frozen=True, eq=False)
class FittedFlow:
    """A fitted flow used like a :class:`~latent_atlas.geometry.metrics.PostProcessing`: ``flow(states)`` → z."""

    module: GaussianisingFlow
    losses: list[float]  # mean training loss (negative log-likelihood per dimension, nats) per epoch
    validation_losses: list[float] = field(default_factory=list)  # held-back loss; index 0 = before training
    best_epoch: int = 0  # the epoch whose parameters were kept (0 = whitening alone)
    name: str = field(default="flow", init=False)

    @property
    def dim(self) -> int:
        """Dimension d of the states."""
        return self.module.dim

    def _apply(self, values: np.ndarray, function: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """Check ``values`` ``(..., d)``, apply ``function`` to its rows without gradients, keep the shape."""
        x = np.asarray(values, dtype=np.float64)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            got = x.shape[-1] if x.ndim else "a scalar"
            raise ValueError(f"the flow expects arrays with last dimension {self.dim}, got {got}")
        if not np.isfinite(x).all():
            raise ValueError(f"the input contains {int((~np.isfinite(x)).sum())} non-finite values (NaN or inf)")
        with torch.no_grad():
            result = function(torch.tensor(x.reshape(-1, self.dim)))
        return result.numpy().reshape(x.shape[:-1] + result.shape[1:])

    def __call__(self, states: np.ndarray) -> np.ndarray:
        """Map states ``(..., d)`` to latents z ``(..., d)``, float64."""
        return self._apply(states, lambda x: self.module(x)[0])

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Map latents ``(..., d)`` back to states ``(..., d)``."""
        return self._apply(z, self.module.inverse)

    def log_likelihood(self, states: np.ndarray) -> np.ndarray:
        """The log-likelihood log p(x) per row of ``states`` ``(..., d)``, in nats, shape ``(...)``."""
        return self._apply(states, lambda x: log_likelihood(self.module, x))
