"""Reading one point of the latent space with every lens and patchscope (the probe targets and the CLI).

A point is a residual state at ``resid.{layer}``: taken from a text at a position, loaded from a saved
``.npy`` vector, or the midpoint of two other probes. Token lists follow METHODS §0.5: the raw top-k, the
top-k restricted to readable tokens (ASCII letters and digits once the space marker is stripped), and the
bottom-k.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latent_atlas.addresses import resid_address
from latent_atlas.errors import ConfigError
from latent_atlas.lenses.base import Lens
from latent_atlas.lenses.patchscope import TARGET_PROMPTS, patchscope, residual_state
from latent_atlas.models import LoadedModel

_READABLE_SCAN = 2048


def is_readable(token: str) -> bool:
    """A token worth showing: ASCII letters/digits once leading space markers are stripped."""
    stripped = token.lstrip(" Ġ▁")
    return bool(stripped) and stripped.isascii() and stripped.isalnum()


def probe_vector(
    loaded: LoadedModel, name: str, probes: Mapping[str, Mapping[str, Any]], layer: int | None = None
) -> tuple[torch.Tensor, int]:
    """Resolve a probe from config to ``(vector (d,), layer)``.

    ``layer`` reads a text probe (or a midpoint of text probes) at another layer than its own; a saved
    vector exists only at its own layer.
    """
    if name not in probes:
        raise ConfigError(f"unknown probe '{name}'; defined probes: {', '.join(sorted(probes)) or 'none'}")
    spec = probes[name]
    if "midpoint" in spec:
        (first, layer_a), (second, layer_b) = (probe_vector(loaded, other, probes, layer) for other in spec["midpoint"])
        if layer_a != layer_b:
            raise ConfigError(f"probes.{name}.midpoint joins probes at layers {layer_a} and {layer_b}; use one layer")
        return (first + second) / 2, layer_a
    own_layer = int(spec["layer"])
    if "vector" in spec and layer is not None and layer != own_layer:
        raise ConfigError(f"probes.{name} is a saved vector at layer {own_layer}; it cannot be read at layer {layer}")
    layer = own_layer if layer is None else layer
    if not 0 <= layer <= loaded.n_layers:
        raise ConfigError(f"probes.{name}.layer = {layer} is outside 0..{loaded.n_layers}")
    if "vector" in spec:
        return load_vector(spec["vector"], loaded.d_model, f"probes.{name}.vector"), layer
    return residual_state(loaded, spec["text"], layer, int(spec.get("position", -1))), layer


def load_vector(path: str | os.PathLike[str], d_model: int, key: str = "--vector") -> torch.Tensor:
    """Load a saved state (``.npy``, shape ``(d,)``), checking its width against the model."""
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    vector = np.load(path).astype(np.float32).reshape(-1)
    if vector.shape != (d_model,):
        raise ConfigError(f"{key}: {path} holds {vector.size} values, the model's width is {d_model}")
    return torch.from_numpy(vector)


def _token_list(loaded: LoadedModel, probs: torch.Tensor, ids: torch.Tensor) -> list[tuple[str, float]]:
    return [(loaded.tokenizer.decode([int(i)]), float(p)) for p, i in zip(probs, ids, strict=True)]


@torch.no_grad()
def lens_reading(loaded: LoadedModel, lens: Lens, vector: torch.Tensor, layer: int, k: int) -> dict[str, Any]:
    """Top-k, readable top-k and bottom-k tokens of one lens for one state."""
    probs = torch.softmax(lens.logits(vector.to(loaded.device)[None], layer)[0].float(), -1).cpu()
    top_probs, top_ids = probs.topk(min(_READABLE_SCAN, probs.numel()))
    top = _token_list(loaded, top_probs[:k], top_ids[:k])
    readable = [pair for pair in _token_list(loaded, top_probs, top_ids) if is_readable(pair[0])][:k]
    bottom_probs, bottom_ids = probs.topk(k, largest=False)
    return {"top": top, "top_readable": readable, "bottom": _token_list(loaded, bottom_probs, bottom_ids)}


def read_point(
    loaded: LoadedModel,
    lenses: Mapping[str, Lens],
    vector: torch.Tensor,
    layer: int,
    k: int = 10,
    targets: Sequence[str] = tuple(TARGET_PROMPTS),
    max_new_tokens: int = 20,
) -> dict[str, Any]:
    """Every lens's reading and every patchscope's continuation of one state at ``resid.{layer}``."""
    readings = {
        name: lens_reading(loaded, lens, vector, layer, k) for name, lens in lenses.items() if lens.reads(layer)
    }
    scopes = {}
    for target in targets:
        if target not in TARGET_PROMPTS:
            raise ConfigError(f"unknown patchscope target '{target}'; use {', '.join(TARGET_PROMPTS)}")
        result = patchscope(loaded, vector, layer, TARGET_PROMPTS[target], max_new_tokens=max_new_tokens, k=k)
        scopes[target] = {
            "generated": result.generated,
            "next_tokens": _token_list(
                loaded, torch.tensor(result.next_token_probs), torch.tensor(result.next_token_ids)
            ),
        }
    return {
        "address": resid_address(layer),
        "layer": layer,
        "norm": float(vector.norm()),
        "lenses": readings,
        "patchscopes": scopes,
    }


def format_reading(reading: Mapping[str, Any], k: int = 8) -> str:
    """A readable text table of a :func:`read_point` result."""
    lines = [f"{reading['address']}  (|h| = {reading['norm']:.1f})", ""]
    width = max(len(name) for name in reading["lenses"]) if reading["lenses"] else 10
    for name, result in reading["lenses"].items():
        tokens = "  ".join(f"{token!r} {prob:.2g}" for token, prob in result["top_readable"][:k])
        lines.append(f"{name:<{width}}  {tokens}")
    lines.append("")
    for target, result in reading["patchscopes"].items():
        lines.append(f"patchscope[{target}] → {result['generated']!r}")
    return "\n".join(lines)
