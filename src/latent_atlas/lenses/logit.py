"""The logit lens (nostalgebraist 2020; METHODS §1): decode every layer as if it were the last."""

import torch

from latent_atlas.lenses.base import Lens, Unembed


class LogitLens(Lens):
    """LL_l(h) = N_f(h) W_U^T: at the last layer it reproduces the model's logits exactly."""

    name = "logit"

    def __init__(self, unembed: Unembed) -> None:
        super().__init__()
        self.unembed = unembed

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Final norm + LM head, whatever the layer."""
        return self.unembed(h)
