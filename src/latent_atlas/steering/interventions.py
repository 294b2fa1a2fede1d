"""Interventions: edits of a forward pass, one strength per batch row (METHODS §7).

Every intervention takes a coefficient per row, so that a whole sweep of strengths runs as one batch; a
row whose coefficient is 0 is returned untouched (bit-identical to the unsteered model). The generation
loop tells an intervention whether the current pass is the prompt pass (``prompt_pass``), which is what
ActAdd needs (it edits the prompt only; generated tokens see the edit through the cache).

- :class:`ResidualAddition`: ``resid.{layer} += c · v``, either front-aligned over the first ``T_s``
  positions of the prompt pass (ActAdd) or at every position of every pass (mean difference, optimised
  vectors).
- :class:`MlpShift`: the in-context-vector shift of Liu et al.'s code, on every block's MLP output (or on the
  residual stream, the ablation), norm preserved.
- :class:`HeadShift`: inference-time intervention (Li et al.): shift selected heads' outputs (the input of the
  attention output projection) at the last position of each pass.
"""

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional

from latent_atlas.architectures import mlp_output, output_projection, projection_weight
from latent_atlas.hooks import edit_residual
from latent_atlas.models import ModelParts


def _per_row(coefficients: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Coefficients shaped to broadcast over ``(B, T, d)`` states (one per row, or one for all)."""
    if coefficients.numel() not in (1, states.shape[0]):
        raise ValueError(f"{coefficients.numel()} coefficients for a batch of {states.shape[0]} rows")
    return coefficients.to(states.device, states.dtype).reshape(-1, 1, 1)


class Intervention(ABC):
    """An edit of the forward pass with one coefficient per batch row."""

    def __init__(self, coefficients: Sequence[float] | torch.Tensor) -> None:
        self.coefficients = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1)
        self.prompt_pass = True

    @abstractmethod
    def attach(self, parts: ModelParts) -> contextlib.AbstractContextManager:
        """A context manager that installs the hooks on a model."""

    @abstractmethod
    def change_norms(self, parts: ModelParts) -> dict[int, torch.Tensor]:
        """Per edited layer, the norm of what the intervention adds to the residual stream, one per row."""

    def with_coefficients(self, coefficients: Sequence[float] | torch.Tensor) -> "Intervention":
        """The same intervention with other strengths (e.g. one row of a sweep)."""
        clone = copy.copy(self)
        clone.coefficients = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1)
        return clone


class ResidualAddition(Intervention):
    """``resid.{layer} += c · v``; ``v`` is ``(d,)``, or ``(T_s, d)`` added front-aligned in the prompt pass.

    ``start`` is the first edited position of the prompt pass (the length of an unedited prefix such as a BOS
    token): ``front`` edits positions ``start .. start + T_s − 1`` of the prompt pass only; ``all`` edits every
    position from ``start`` on in the prompt pass and every position of later (cached) passes.
    """

    def __init__(
        self,
        layer: int,
        vector: torch.Tensor,
        coefficients: Sequence[float] | torch.Tensor,
        positions: Literal["front", "all"] = "all",
        start: int = 0,
    ) -> None:
        super().__init__(coefficients)
        if positions not in ("front", "all"):
            raise ValueError(f"positions must be 'front' or 'all', got {positions!r}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.layer, self.vector, self.positions, self.start = layer, vector.float(), positions, start

    def _edit(self, states: torch.Tensor) -> torch.Tensor:
        scale = _per_row(self.coefficients, states)
        if self.positions == "all":
            added = scale * self.vector.to(states)
            if self.prompt_pass and self.start > 0:
                added = added * (torch.arange(states.shape[1], device=states.device) >= self.start)[:, None]
            return torch.where(scale == 0, states, states + added)
        if not self.prompt_pass:
            return states
        vector = self.vector.to(states).reshape(-1, states.shape[-1])
        end = self.start + vector.shape[0]
        if end > states.shape[1]:
            raise ValueError(
                f"the steering vector spans positions {self.start}..{end - 1} but the prompt has {states.shape[1]}; "
                "use a prompt at least as long as the contrast prompts"
            )
        edited = states.clone()
        edited[:, self.start : end] += scale * vector
        return torch.where(scale == 0, states, edited)

    @contextlib.contextmanager
    def attach(self, parts: ModelParts) -> Iterator[None]:
        """Install the addition at ``resid.{layer}``."""
        with edit_residual(parts, self.layer, self._edit):
            yield

    def change_norms(self, parts: ModelParts) -> dict[int, torch.Tensor]:
        """The norm of the added vector per row (for a multi-position vector, the mean over the edited positions)."""
        return {
            self.layer: self.coefficients.abs() * self.vector.reshape(-1, self.vector.shape[-1]).norm(dim=-1).mean()
        }


def icv_shift(outputs: torch.Tensor, direction: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Liu et al.'s shift: normalize(normalize(m) + λ(1 + max(0, cos(m, −u))) u/‖u‖) · ‖m‖.

    ``strength`` broadcasts over ``outputs (B, T, d)``; rows of strength 0 are returned unchanged.
    """
    norms = outputs.norm(dim=-1, keepdim=True)
    unit = functional.normalize(direction.to(outputs), dim=-1)
    opposed = torch.relu(-(functional.normalize(outputs, dim=-1) * unit).sum(-1, keepdim=True))
    shifted = functional.normalize(functional.normalize(outputs, dim=-1) + strength * (1 + opposed) * unit, dim=-1)
    return torch.where(strength == 0, outputs, shifted * norms)


class MlpShift(Intervention):
    """The in-context-vector shift at every position of every pass, on each block's MLP output.

    That is where the published code shifts; ``site="residual"`` shifts each block's output instead (the
    ablation). ``vectors[l - 1]`` is block ``l``'s direction, shape ``(L, d)``.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        coefficients: Sequence[float] | torch.Tensor,
        site: Literal["mlp", "residual"] = "mlp",
    ) -> None:
        super().__init__(coefficients)
        if site not in ("mlp", "residual"):
            raise ValueError(f"site must be 'mlp' or 'residual', got {site!r}")
        self.vectors, self.site = vectors.float(), site
        self.changes: dict[int, list[torch.Tensor]] = {}

    def _editor(self, block: int) -> Any:
        def edit(outputs: torch.Tensor) -> torch.Tensor:
            shifted = icv_shift(outputs, self.vectors[block - 1], _per_row(self.coefficients, outputs))
            self.changes.setdefault(block, []).append((shifted - outputs).norm(dim=-1).mean(-1).detach().cpu())
            return shifted

        return edit

    @contextlib.contextmanager
    def attach(self, parts: ModelParts) -> Iterator[None]:
        """Install the shift on every block."""
        self.changes = {}
        with contextlib.ExitStack() as stack:
            for block in range(1, len(parts.layers) + 1):
                edit = self._editor(block)
                if self.site == "residual":
                    stack.enter_context(edit_residual(parts, block, edit))
                else:
                    stack.enter_context(_edit_output(mlp_output(parts.layers[block - 1]), edit))
            yield

    def change_norms(self, parts: ModelParts) -> dict[int, torch.Tensor]:
        """Mean norm of the change per row, per block, over the passes since :meth:`attach`."""
        return {block: torch.stack(values).mean(0) for block, values in self.changes.items()}


@contextlib.contextmanager
def _edit_output(module: nn.Module, edit: Any) -> Iterator[None]:
    """Replace a module's output (a tensor, or a tuple led by one) by ``edit(output)``."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return (edit(output[0]), *output[1:]) if isinstance(output, tuple) else edit(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class HeadDirection:
    """One head's ITI shift: unit direction θ (``(d_h,)``) and the std σ of activations along it."""

    layer: int  # block 1..L
    head: int
    direction: torch.Tensor
    std: float


class HeadShift(Intervention):
    """``a^{l,h} += α σ θ`` for the selected heads, at the last position of each pass (ITI).

    ``from_position`` (one int, or one per row) applies the shift at every position from there on instead
    (scoring a teacher-forced continuation the way generation would have seen it).
    """

    def __init__(
        self, heads: Sequence[HeadDirection], head_dim: int, coefficients: Sequence[float] | torch.Tensor
    ) -> None:
        super().__init__(coefficients)
        self.heads, self.head_dim = list(heads), head_dim
        self.from_position: int | Sequence[int] | None = None

    def _layer_shifts(self, parts: ModelParts) -> dict[int, torch.Tensor]:
        """Per block with a selected head, the σθ of its heads side by side: the output projection's input space."""
        shifts: dict[int, torch.Tensor] = {}
        for head in self.heads:
            if head.layer not in shifts:
                width = projection_weight(output_projection(parts.layers[head.layer - 1])).shape[1]
                shifts[head.layer] = torch.zeros(width)
            start = head.head * self.head_dim
            shifts[head.layer][start : start + self.head_dim] += head.std * head.direction.float().cpu()
        return shifts

    def _editor(self, layer_shift: torch.Tensor) -> Any:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            inputs = args[0]
            scale = _per_row(self.coefficients, inputs)
            if not bool((scale != 0).any()):
                return args
            positions = torch.arange(inputs.shape[1], device=inputs.device)
            if self.from_position is None:
                edit = positions == inputs.shape[1] - 1
            else:
                start = torch.as_tensor(self.from_position, device=inputs.device).reshape(-1, 1)
                edit = positions >= start
            edited = inputs.clone()  # keeps the input's strides, so unshifted rows stay bit-identical
            edited += (scale * layer_shift.to(inputs)) * edit.reshape(-1, inputs.shape[1], 1).to(inputs.dtype)
            return (edited, *args[1:])

        return pre_hook

    @contextlib.contextmanager
    def attach(self, parts: ModelParts) -> Iterator[None]:
        """Install a pre-hook on the output projection of every block with a selected head."""
        handles = [
            output_projection(parts.layers[layer - 1]).register_forward_pre_hook(self._editor(shift))
            for layer, shift in self._layer_shifts(parts).items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def change_norms(self, parts: ModelParts) -> dict[int, torch.Tensor]:
        """Norm per row of what the shift adds to ``resid.{layer}`` (through the output projection)."""
        norms = {}
        for layer, shift in self._layer_shifts(parts).items():
            weight = projection_weight(output_projection(parts.layers[layer - 1]))
            norms[layer] = self.coefficients.abs() * float((weight @ shift.to(weight)).norm().detach())
        return norms
