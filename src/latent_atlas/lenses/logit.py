"""The logit lens (nostalgebraist 2020; METHODS §1): decode every layer as if it were the last."""

import torch

from latent_atlas.lenses.base import Lens, Readout, Unembed


class LogitLens(Lens):
    """LL_l(h) = N_f(h) W_U^T: at the last layer it reproduces the model's logits exactly."""

    name = "logit"

    def __init__(self, unembed: Unembed) -> None:
        super().__init__()
        self.unembed = unembed

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Final norm + LM head, whatever the layer."""
        return self.unembed(h)

    def readout(self, layer: int) -> Readout | None:
        """The model's head, the same at every layer."""
        return self.unembed.readout()

    def hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The state through the final norm."""
        return self.unembed.final_norm(h)
