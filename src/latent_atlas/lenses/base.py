"""The lens interface, the shared, frozen unembedding (final norm + LM head) and the vocabulary side of a lens."""

import copy
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from latent_atlas.architectures import LogitTransform, ScaledHead
from latent_atlas.models import ModelParts


@dataclass(frozen=True, eq=False)
class Readout:
    """The vocabulary side of a lens: logits ``transform(g @ weight.T + bias) / temperature`` of hidden vectors g.

    ``weight`` is ``(V, d)`` (a transposed view will do), ``bias`` ``(V,)`` or None; ``transform`` is the model's
    own post-head transform (scales, Gemma 2's soft-cap). Everything after the product acts on each logit alone,
    so any block of vocabulary columns can be computed by itself, exactly as the full logits compute it.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = field(default_factory=LogitTransform)
    temperature: float = 1.0

    @property
    def vocab_size(self) -> int:
        """V, the number of logits."""
        return self.weight.shape[0]

    def scaled(self, factor: float) -> "Readout":
        """The same readout with its temperature multiplied by ``factor``."""
        return replace(self, temperature=self.temperature * factor)

    def logits(
        self, hidden: torch.Tensor, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of the vocabulary columns ``start:stop`` for hidden vectors ``(..., d)``: ``(..., stop - start)``.

        ``out`` (2-D, contiguous, of the result's shape) receives the product, for a caller that reuses a buffer.
        """
        product = self.product(hidden.reshape(-1, hidden.shape[-1]), start, stop, out)
        return self.finish(product).view(*hidden.shape[:-1], -1)

    def product(
        self, hidden: torch.Tensor, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The matrix part alone, ``hidden @ weight[start:stop].T + bias[start:stop]`` for ``hidden`` ``(n, d)``."""
        weight = self.weight[start:stop]
        if self.bias is None:
            return torch.mm(hidden, weight.T, out=out)
        return torch.addmm(self.bias[start:stop], hidden, weight.T, out=out)

    def logits_at(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The logit of token ``ids[i]`` for each hidden vector ``hidden[i]`` (``(n, d)``, ``(n,)``): ``(n,)``.

        Taken from one ``(n, n)`` product, the same matrix product as :meth:`logits`'s, so the values are those
        of the full logits wherever the BLAS rounds each entry independently of the matrix's width (callers that
        rely on equality check it).
        """
        bias = None if self.bias is None else self.bias[ids]
        weight = self.weight[ids]
        product = torch.mm(hidden, weight.T) if bias is None else torch.addmm(bias, hidden, weight.T)
        return self.finish(product).diagonal()

    def finish(self, product: torch.Tensor) -> torch.Tensor:
        """The elementwise part: the model's transform, then the temperature (in place where it can)."""
        logits = self.transform(product)
        return logits.div_(self.temperature) if self.temperature != 1.0 else logits

    def slope(self, logits: torch.Tensor) -> torch.Tensor | float:
        """The derivative of the logits by the product, elementwise, from the logits (a number where constant)."""
        rate = self.transform.scale / self.transform.divisor / self.temperature
        cap = self.transform.softcap
        if cap is None:
            return rate
        return (logits * (self.temperature / cap)).square_().neg_().add_(1.0).mul_(rate)  # tanh' = 1 - tanh^2


def head_readout(head: nn.Module) -> Readout | None:
    """The readout of an LM head (a linear layer, possibly inside a :class:`ScaledHead`); None for other heads."""
    transform = LogitTransform()
    if isinstance(head, ScaledHead):
        head, transform = head.head, head.transform
    if not isinstance(head, nn.Linear):
        return None
    return Readout(head.weight, head.bias, transform)


class Unembed(nn.Module):
    """U(h) = N_f(h) W_U^T (+ b_U): frozen copies of the final norm and the LM head (METHODS §0.1)."""

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.final_norm = copy.deepcopy(final_norm)
        self.lm_head = copy.deepcopy(lm_head)
        self.requires_grad_(False)

    @classmethod
    def from_parts(cls, parts: ModelParts) -> "Unembed":
        """Copy the final norm and head of a located model."""
        return cls(parts.final_norm, parts.lm_head)

    @property
    def weight(self) -> torch.Tensor:
        """W_U, shape ``(V, d)``."""
        return self.lm_head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., V)`` of states ``(..., d)`` read through the final norm."""
        return self.lm_head(self.final_norm(h))

    def readout(self) -> Readout | None:
        """The head as a :class:`Readout` of the normed state (None when the head is not a linear layer)."""
        return head_readout(self.lm_head)

    def fingerprint(self) -> str:
        """A short hash of W_U and the final norm's parameters, checked when a fitted lens is loaded."""
        digest = hashlib.sha256()
        for tensor in (*self.final_norm.parameters(), self.lm_head.weight):
            digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


class Lens(nn.Module, ABC):
    """Read residual states ``resid.{layer}`` as vocabulary logits.

    A lens that factors as a hidden-side map and a :class:`Readout` says so through :meth:`readout` and
    :meth:`hidden` (``logits(h, layer) = readout(layer).logits(hidden(h, layer))`` up to float rounding); the
    evaluation then computes its logits a block of the vocabulary at a time. Others return None from
    :meth:`readout` and are read through :meth:`logits`.
    """

    name: str = "lens"
    temperature: float = 1.0  # what ``logits`` divides its raw scores by
    fits_temperature: bool = False  # scale-free scores: the evaluation fits a temperature per layer

    @abstractmethod
    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Return logits of shape ``(..., V)`` for states ``h`` of shape ``(..., d)`` at ``layer``."""

    def readout(self, layer: int) -> Readout | None:
        """The vocabulary side at ``layer``, shared by every state; None for a lens that does not factor."""
        return None

    def hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The hidden-side map, ``(..., d)`` to what :meth:`readout` reads; only for lenses with a readout."""
        raise NotImplementedError(f"{type(self).__name__} has no readout; use logits()")

    def reads(self, layer: int) -> bool:
        """Whether this lens can read ``resid.{layer}`` (every lens can, unless it says otherwise)."""
        return True

    def top_k(self, h: torch.Tensor, layer: int, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(probabilities, token ids)`` of the k most likely tokens, each ``(..., k)``."""
        probabilities = torch.softmax(self.logits(h, layer).float(), dim=-1)
        return probabilities.topk(k, dim=-1)
