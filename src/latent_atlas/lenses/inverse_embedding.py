"""Reading a state with the *input* embedding (Dar et al. 2023; METHODS §3).

Which input token's embedding does a state look like? ``transpose`` scores h against each embedding row
(h W_E^T); ``pinv`` solves for the token coefficients c with c W_E ≈ h (h W_E^+, the principled right
inverse, computed by SVD in float64). The raw state is first rescaled to the mean embedding norm, so the
scores live on the embedding scale at every depth (residual norms grow a hundredfold with depth). The scores
are not logits: the lens evaluation divides them by a temperature fitted per layer on training tokens
(:mod:`latent_atlas.lenses.temperature`) before it compares KL and CE with other lenses; rankings do not
depend on it. No final norm is applied: this lens reads the raw stream.
"""

from typing import Literal

import torch

from latent_atlas.lenses.base import Lens, Readout
from latent_atlas.linalg import PseudoInverse, pinv_svd

Variant = Literal["transpose", "pinv"]


class InverseEmbeddingLens(Lens):
    """Scores ``rescale(h) @ R`` with ``R`` = W_E^T (transpose) or W_E^+ (pinv), shape ``(d, V)``."""

    fits_temperature = True

    def __init__(
        self, embedding: torch.Tensor, variant: Variant = "transpose", transposed_pinv: PseudoInverse | None = None
    ) -> None:
        """Build the reader.

        Args:
            embedding: W_E, shape ``(V, d)``.
            variant: ``transpose`` or ``pinv``.
            transposed_pinv: an already computed pseudo-inverse of W_E^T (tied models share it with the
                semantic-basis lens: (W_E)^+ = ((W_E^T)^+)^T), to skip a second SVD.
        """
        super().__init__()
        if variant not in ("transpose", "pinv"):
            raise ValueError(f"variant must be 'transpose' or 'pinv', got {variant!r}")
        self.variant = variant
        self.name = f"inverse_embedding_{variant}"
        weight = embedding.detach().to(torch.float64)
        if variant == "transpose":
            reader = weight.T
        elif transposed_pinv is not None:
            reader = transposed_pinv.pseudo_inverse.T
        else:
            reader = pinv_svd(weight).pseudo_inverse
        self.register_buffer("reader", reader.to(torch.float32).contiguous())
        self.register_buffer("scale", weight.norm(dim=-1).mean().to(torch.float32))

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Scores of every input token for states rescaled to the mean embedding norm."""
        return self.readout(layer).logits(self.hidden(h, layer))

    def readout(self, layer: int) -> Readout:
        """``R`` read column by column (``R^T`` is the readout's ``(V, d)`` weight)."""
        return Readout(self.reader.T)

    def hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The state rescaled to the mean embedding norm."""
        return h * (self.scale / h.norm(dim=-1, keepdim=True).clamp_min(1e-12))
