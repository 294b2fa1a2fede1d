"""Vocabulary-defined semantic bases and disentangled logits (Gu et al.; METHODS §4).

The head matrix W = W_U^T (d x V) has a pseudo-inverse S = W^+ (V x d) whose row s_i is the least-squares
latent whose logits are closest to the one-hot e_i: every token gets a fixed point inside the latent space.
A state is read by its cosine to every basis. The bases live in the post-final-norm space, so states of
every layer are read through the final norm N_f (as the logit lens is). Cosines lie in [-1, 1]: softmax
over them is almost uniform, so logits are divided by ``temperature`` (default 0.05, a choice of this
project, used by probes and neighbourhoods). The lens evaluation instead fits one temperature per layer on
training tokens (:mod:`latent_atlas.lenses.temperature`), so that its KL and CE are comparable with the
logit lens's; rankings do not depend on it.
"""

import torch
from torch.nn import functional

from latent_atlas.lenses.base import Lens, Readout, Unembed
from latent_atlas.linalg import PseudoInverse, pinv_svd


class SemanticBasisLens(Lens):
    """cos(N_f(h), s_i) / temperature for every token i, with s_i the rows of W^+ (float64 SVD)."""

    name = "semantic_basis"
    fits_temperature = True

    def __init__(
        self, unembed: Unembed, temperature: float = 0.05, rcond: float = 1e-6, pinv: PseudoInverse | None = None
    ) -> None:
        """``pinv``: an already computed (W_U^T)^+ (e.g. cached by the probe), else it is computed here."""
        super().__init__()
        self.unembed = unembed
        self.temperature = temperature
        self.pinv: PseudoInverse = pinv if pinv is not None else pinv_svd(unembed.weight.T, rcond)
        bases = self.pinv.pseudo_inverse
        norms = bases.norm(dim=-1, keepdim=True)
        # A token whose unembedding is zero (e.g. an untrained padding row) has no direction: cosine 0.
        live = norms > 1e-8 * norms.max()
        unit = torch.where(live, bases / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        self.register_buffer("unit_bases", unit.to(torch.float32))

    @property
    def condition_number(self) -> float:
        """kappa(W) = s_max / s_min of the head matrix."""
        return self.pinv.condition_number

    @property
    def bases(self) -> torch.Tensor:
        """The semantic bases S = W^+ in float64, shape ``(V, d)``."""
        return self.pinv.pseudo_inverse

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Cosine of the normed state to every basis, divided by the temperature."""
        return self.readout(layer).logits(self.hidden(h, layer))

    def readout(self, layer: int) -> Readout:
        """The unit bases, divided by the temperature."""
        return Readout(self.unit_bases, temperature=self.temperature)

    def hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The unit vector of the state through the final norm."""
        return functional.normalize(self.unembed.final_norm(h), dim=-1)
