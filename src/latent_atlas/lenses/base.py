"""The lens interface and the shared, frozen unembedding (final norm + LM head)."""

import copy
import hashlib
from abc import ABC, abstractmethod

import torch
from torch import nn

from latent_atlas.models import ModelParts


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

    def fingerprint(self) -> str:
        """A short hash of W_U and the final norm's parameters, checked when a fitted lens is loaded."""
        digest = hashlib.sha256()
        for tensor in (*self.final_norm.parameters(), self.lm_head.weight):
            digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


class Lens(nn.Module, ABC):
    """Read residual states ``resid.{layer}`` as vocabulary logits."""

    name: str = "lens"
    temperature: float = 1.0  # what ``logits`` divides its raw scores by
    fits_temperature: bool = False  # scale-free scores: the evaluation fits a temperature per layer

    @abstractmethod
    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Return logits of shape ``(..., V)`` for states ``h`` of shape ``(..., d)`` at ``layer``."""

    def reads(self, layer: int) -> bool:
        """Whether this lens can read ``resid.{layer}`` (every lens can, unless it says otherwise)."""
        return True

    def top_k(self, h: torch.Tensor, layer: int, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(probabilities, token ids)`` of the k most likely tokens, each ``(..., k)``."""
        probabilities = torch.softmax(self.logits(h, layer).float(), dim=-1)
        return probabilities.topk(k, dim=-1)
