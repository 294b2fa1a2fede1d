"""One fitted temperature per lens and layer, so that scale-free lenses have comparable KL and CE.

The semantic-basis lens scores tokens by cosine and the inverse-embedding lenses by a dot product with a
rescaled state: neither score is a logit, so the KL and cross-entropy of ``softmax(score)`` depend on an
arbitrary scale. Here each such lens gets, at each layer, the single temperature T that minimises the
mean cross-entropy H(p_final, softmax(score / T)) over tokens of the *training* split, i.e. the mean
KL(p_final || p_lens) that the lens evaluation reports (the tuned lens's training objective too). Rankings,
top-1 agreement and surprisal do not depend on T.

The loss is convex in beta = 1/T (a log-sum-exp plus a linear term), with derivative
E_q[s] - E_p[s] and second derivative Var_q[s] (q = softmax(beta s), p = p_final), so beta is found by
Newton's method safeguarded by bisection inside a bracket of the derivative's sign (5-10 passes over the
scores per lens and layer).
"""

import math
from collections.abc import Mapping, Sequence

import polars as pl
import torch
from torch.nn import functional

from latent_atlas.lenses.base import Lens, Readout, Unembed
from latent_atlas.lenses.evaluate import EvaluationTokens
from latent_atlas.store import ActivationStore

TEMPERATURE_BOUNDS = (1e-4, 1e4)


def _moments(scores: torch.Tensor, beta: float, chunk_size: int) -> tuple[float, float]:
    """Mean over rows of E_q[s] and Var_q[s] with q = softmax(beta * s); scores ``(N, V)``."""
    mean_sum, var_sum = 0.0, 0.0
    for start in range(0, scores.shape[0], chunk_size):
        chunk = scores[start : start + chunk_size]
        shifted = chunk - chunk.amax(-1, keepdim=True)  # q and its moments about the row maximum (stable)
        weights = torch.exp(beta * shifted)
        total = weights.sum(-1)
        first = torch.bmm(weights[:, None, :], shifted[:, :, None]).view(-1) / total
        second = torch.bmm(weights[:, None, :], shifted.square_()[:, :, None]).view(-1) / total
        var_sum += float((second - first.square()).clamp_min(0).double().sum())
        mean_sum += float((first + chunk.amax(-1)).double().sum())
    return mean_sum / scores.shape[0], var_sum / scores.shape[0]


def fit_temperature(
    scores: torch.Tensor,
    target_log_probs: torch.Tensor,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tolerance: float = 1e-4,
    max_iter: int = 100,
    chunk_size: int = 128,
    initial: float | None = None,
) -> float:
    """The T in ``bounds`` minimising mean_n H(p_n, softmax(scores_n / T)).

    Newton's method on beta = 1/T (the loss is convex in beta), started at ``initial`` or at
    1/T = 1/std(scores), and kept inside a bracket of log beta that the derivative's sign shrinks (bisection
    in log beta when a step would leave it); the derivative is monotone, so the bracket always holds the
    minimiser. While no point with a falling loss has been seen, a rising one triggers a check of the
    largest temperature: when the loss still falls there, the scores are no better than uniform and that
    bound is returned.

    Args:
        scores: a lens's scores for N tokens, shape ``(N, V)`` (float32).
        target_log_probs: log p of the target distribution of each token, shape ``(N, V)``.
        bounds: (smallest, largest) temperature; the fit stops at a bound when the optimum lies beyond it
            (at the largest one when the scores are no better than uniform).
        tolerance: stop when a step changes log T by less than this.
        max_iter: at most this many Newton or bisection steps.
        chunk_size: rows processed at once (bounds the V-sized temporaries).
        initial: where Newton starts (e.g. the fit of a neighbouring layer); default 1 / std(scores).

    Returns:
        The fitted temperature.
    """
    if scores.shape != target_log_probs.shape or scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores and target log-probabilities must both be (N, V), got {tuple(scores.shape)}, "
                         f"{tuple(target_log_probs.shape)}")  # fmt: skip
    scores = scores.float()
    target_mean = float((target_log_probs.float().exp() * scores).sum(-1).double().mean())
    lowest = -math.log(bounds[1])
    lo, hi = lowest, -math.log(bounds[0])  # bracket of u = log beta
    spread = float(scores.std(dim=-1).mean())
    start = initial if initial is not None else spread
    u = min(max(-math.log(start), lo), hi) if start > 0 else 0.0
    for _ in range(max_iter):
        beta = math.exp(u)
        mean, variance = _moments(scores, beta, chunk_size)
        gradient = mean - target_mean  # d loss / d beta
        if gradient > 0:
            if lo == lowest and _moments(scores, math.exp(lowest), chunk_size)[0] >= target_mean:
                return bounds[1]  # the loss still falls at the largest temperature: no better than uniform
            hi = u
        else:
            lo = u
        newton = beta - gradient / variance if variance > 0 else 0.0  # d2 loss / d beta2 = Var_q[s]
        step = math.log(newton) if newton > 0 else math.nan
        following = step if lo < step < hi else (lo + hi) / 2
        converged = abs(following - u) <= tolerance or hi - lo <= tolerance
        u = following
        if converged:
            break
    return math.exp(-u)


class TemperatureScaledLens(Lens):
    """A lens whose logits at each layer are further divided by a fitted factor for that layer.

    ``temperature_at(layer)`` is the total divisor of the wrapped lens's raw scores (its own temperature,
    e.g. the semantic-basis lens's configured one, times the fitted factor).
    """

    def __init__(self, lens: Lens, factors: Mapping[int, float]) -> None:
        super().__init__()
        self.inner = lens
        self.name = lens.name
        self.factors = dict(factors)

    def reads(self, layer: int) -> bool:
        """The layers the wrapped lens reads and a factor was fitted for."""
        return layer in self.factors and self.inner.reads(layer)

    def temperature_at(self, layer: int) -> float:
        """The temperature of the raw scores at ``layer``."""
        return self.inner.temperature * self.factors[layer]

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The wrapped lens's logits divided by the layer's factor, shape ``(..., V)``."""
        return self.inner.logits(h, layer) / self.factors[layer]

    def readout(self, layer: int) -> Readout | None:
        """The wrapped lens's readout with the layer's factor in its temperature."""
        readout = self.inner.readout(layer)
        return None if readout is None else readout.scaled(self.factors[layer])

    def hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The wrapped lens's hidden-side map."""
        return self.inner.hidden(h, layer)


@torch.no_grad()
def fit_lens_temperatures(
    store: ActivationStore,
    unembed: Unembed,
    lenses: Mapping[str, Lens],
    layers: Sequence[int],
    tokens: EvaluationTokens,
    chunk_size: int = 256,
) -> tuple[dict[str, Lens], pl.DataFrame]:
    """Fit a temperature for every lens with ``fits_temperature`` at every layer, on ``tokens``.

    Args:
        store: the activation store (states of ``layers`` and ``ln_final``).
        unembed: the frozen unembedding that gives the model's final distribution.
        lenses: lenses by name; others are returned unchanged.
        layers: layers to fit.
        tokens: store rows to fit on (training split).
        chunk_size: tokens scored at once.

    Returns:
        The lenses with the fitted ones wrapped in :class:`TemperatureScaledLens`, and a table of the
        temperatures on each lens's raw score scale (``lens``, ``layer``, ``temperature``).
    """
    fitted = {name: lens for name, lens in lenses.items() if lens.fits_temperature}
    final = unembed.lm_head(torch.from_numpy(store.read("ln_final", tokens.rows)))
    target = functional.log_softmax(final.float(), dim=-1)
    del final
    factors: dict[str, dict[int, float]] = {name: {} for name in fitted}
    for layer in layers:
        states = torch.from_numpy(store.read(layer, tokens.rows))
        for name, lens in fitted.items():
            if not lens.reads(layer):
                continue
            chunks = range(0, len(states), chunk_size)
            scores = torch.cat([lens.logits(states[start : start + chunk_size], layer) for start in chunks])
            previous = [t for t in factors[name].values() if TEMPERATURE_BOUNDS[0] < t < TEMPERATURE_BOUNDS[1]]
            factors[name][layer] = fit_temperature(scores, target, initial=previous[-1] if previous else None)
            del scores
    scaled = {name: TemperatureScaledLens(lens, factors[name]) for name, lens in fitted.items()}
    records = [
        {"lens": name, "layer": layer, "temperature": lens.temperature_at(layer)}
        for name, lens in scaled.items()
        for layer in sorted(lens.factors)
    ]
    schema = {"lens": pl.String, "layer": pl.Int64, "temperature": pl.Float64}
    return {name: scaled.get(name, lens) for name, lens in lenses.items()}, pl.DataFrame(records, schema=schema)
