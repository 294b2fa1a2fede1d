"""Token grids: each lens's top token at every (layer, position) of a sentence (the classic lens picture)."""

from collections.abc import Mapping, Sequence

import polars as pl
import torch

from latent_atlas.addresses import parse_resid_address
from latent_atlas.hooks import capture_residuals
from latent_atlas.lenses.base import Lens
from latent_atlas.models import LoadedModel


@torch.no_grad()
def token_grid(loaded: LoadedModel, lenses: Mapping[str, Lens], text: str, layers: Sequence[int]) -> pl.DataFrame:
    """Top token and its probability for every lens, layer and position of ``text``.

    Returns:
        Columns ``lens``, ``layer``, ``position``, ``input_token``, ``next_token`` (the actual next token,
        empty at the end), ``top_token``, ``probability``.
    """
    encoded = loaded.tokenizer(text, return_tensors="pt").to(loaded.device)
    states: dict[int, torch.Tensor] = {}

    def keep(address: str, tensor: torch.Tensor) -> None:
        states[parse_resid_address(address)] = tensor[0].float()

    with capture_residuals(loaded.parts, layers, keep, final_norm=False):
        loaded.parts.body(**encoded, use_cache=False)
    ids = encoded["input_ids"][0].tolist()
    pieces = [loaded.tokenizer.decode([i]) for i in ids]
    rows = []
    for name, lens in lenses.items():
        for layer in layers:
            if not lens.reads(layer):
                continue
            probs, top = torch.softmax(lens.logits(states[layer], layer).float(), -1).max(-1)
            for position, (prob, token) in enumerate(zip(probs.tolist(), top.tolist(), strict=True)):
                rows.append(
                    {
                        "lens": name,
                        "layer": layer,
                        "position": position,
                        "input_token": pieces[position],
                        "next_token": pieces[position + 1] if position + 1 < len(pieces) else "",
                        "top_token": loaded.tokenizer.decode([token]),
                        "probability": prob,
                    }
                )
    return pl.DataFrame(rows)
