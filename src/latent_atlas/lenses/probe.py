"""Reading one point of the latent space with every lens and patchscope (the probe targets and the CLI).

A point is a residual state at ``resid.{layer}``: taken from a text at a position, loaded from a saved
``.npy`` vector, or the midpoint of two other probes. Token lists follow METHODS §0.5: the raw top-k, the
top-k restricted to readable tokens (ASCII letters and digits once the space marker is stripped), and the
bottom-k.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latent_atlas.addresses import resid_address
from latent_atlas.errors import ConfigError
from latent_atlas.hooks import capture_residuals
from latent_atlas.lenses.base import Lens, Unembed
from latent_atlas.lenses.patchscope import TARGET_PROMPTS, patchscope, residual_state, resolve_position
from latent_atlas.linalg import PseudoInverse, pinv_svd
from latent_atlas.models import LoadedModel
from latent_atlas.provenance import atomic_output

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
    try:
        return residual_state(loaded, spec["text"], layer, int(spec.get("position", -1))), layer
    except ConfigError as error:
        raise ConfigError(f"probes.{name}: {error}") from None


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
    unread = {name: _why_unread(lens, layer) for name, lens in lenses.items() if not lens.reads(layer)}
    return {
        "address": resid_address(layer),
        "layer": layer,
        "norm": float(vector.norm()),
        "lenses": readings,
        "lenses_not_reading": unread,
        "patchscopes": scopes,
    }


def _why_unread(lens: Lens, layer: int) -> str:
    """Why a lens gives no reading at a layer (a tuned lens reads only the layers it was trained at)."""
    trained = getattr(lens, "trained_layers", None)
    if trained is not None:
        return f"not trained at {resid_address(layer)} (trained at {', '.join(map(str, trained)) or 'none'})"
    return f"does not read {resid_address(layer)}"


def format_reading(reading: Mapping[str, Any], k: int = 8) -> str:
    """A readable text table of a :func:`read_point` result."""
    lines = [f"{reading['address']}  (|h| = {reading['norm']:.1f})", ""]
    width = max(len(name) for name in reading["lenses"]) if reading["lenses"] else 10
    for name, result in reading["lenses"].items():
        tokens = "  ".join(f"{token!r} {prob:.2g}" for token, prob in result["top_readable"][:k])
        lines.append(f"{name:<{width}}  {tokens}")
    for name, why in reading.get("lenses_not_reading", {}).items():
        lines.append(f"{name:<{width}}  ({why})")
    lines.append("")
    for target, result in reading["patchscopes"].items():
        lines.append(f"patchscope[{target}] → {result['generated']!r}")
    return "\n".join(lines)


def format_tokens(tokens: Sequence[tuple[str, float]], k: int) -> str:
    """``'tok' p`` pairs side by side."""
    return "  ".join(f"{token!r} {prob:.2g}" for token, prob in tokens[:k])


@dataclass(frozen=True)
class TextPoint:
    """One text read at one position: the token there, the model's own next-token top-k, the states."""

    text: str
    position: int
    n_tokens: int
    token: str
    prediction: list[tuple[str, float]]
    states: dict[int, torch.Tensor]


@torch.no_grad()
def read_text(loaded: LoadedModel, text: str, layers: Sequence[int], position: int = -1, k: int = 10) -> TextPoint:
    """One forward pass over ``text``: ``resid.{layer}`` at ``position`` for each layer, and the model's logits there.

    Raises:
        ConfigError: for an empty text or a position outside it.
    """
    encoded = loaded.tokenizer(text, return_tensors="pt").to(loaded.device)
    ids = encoded["input_ids"][0]
    index = resolve_position(position, len(ids))
    captured: dict[str, torch.Tensor] = {}

    def keep(address: str, states: torch.Tensor) -> None:
        captured[address] = states[0, index].float().cpu()

    with capture_residuals(loaded.parts, sorted(set(layers)), keep, final_norm=False):
        logits = loaded.model(**encoded, use_cache=False).logits[0, index]
    probs, top = torch.softmax(logits.float(), -1).topk(k)
    return TextPoint(
        text=text,
        position=index,
        n_tokens=len(ids),
        token=loaded.tokenizer.decode([int(ids[index])]),
        prediction=_token_list(loaded, probs.cpu(), top.cpu()),
        states={layer: captured[resid_address(layer)] for layer in layers},
    )


def cache_dir() -> Path:
    """Where derived per-model data is cached: ``$LATENT_ATLAS_CACHE``, else ``$XDG_CACHE_HOME/latent-atlas``."""
    if os.environ.get("LATENT_ATLAS_CACHE"):
        return Path(os.environ["LATENT_ATLAS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latent-atlas"


def cached_pinv(matrix: torch.Tensor, key: str, rcond: float = 1e-6, directory: Path | None = None) -> PseudoInverse:
    """:func:`~latent_atlas.linalg.pinv_svd` of ``matrix``, kept on disk under ``key`` (e.g. weights sha256 + role).

    The float64 SVD of a vocabulary-sized head takes seconds; its result is saved in float32 (what every lens
    reads it in) and given back as float64. An unreadable or mismatched entry is recomputed and rewritten.
    """
    path = (directory or cache_dir()) / f"pinv-{key}-{rcond:g}.pt"
    shape = (matrix.shape[1], matrix.shape[0])
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if tuple(saved["pseudo_inverse"].shape) == shape:
                inverse = saved["pseudo_inverse"].to(torch.float64)
                return PseudoInverse(inverse, saved["singular_values"], int(saved["rank"]), float(saved["condition"]))
        except Exception:  # a damaged entry of any kind (truncated, foreign) is recomputed
            pass
    pinv = pinv_svd(matrix, rcond)
    record = {
        "pseudo_inverse": pinv.pseudo_inverse.to(torch.float32).cpu(),
        "singular_values": pinv.singular_values.cpu(),
        "rank": pinv.rank,
        "condition": pinv.condition_number,
    }
    try:
        with atomic_output(path) as tmp:
            torch.save(record, tmp)
    except OSError:
        pass  # a read-only cache costs time, never a result
    return pinv


def model_pinvs(loaded: LoadedModel) -> dict[str, PseudoInverse]:
    """The pseudo-inverses the semantic-basis and inverse-embedding lenses need, cached by the weights' sha256.

    ``head``: (W_U^T)^+; ``embed``: (W_E^T)^+, only for an untied model (a tied one shares ``head``).
    """
    sha = loaded.manifest["weights_sha256"]
    unembed = Unembed.from_parts(loaded.parts).weight
    pinvs = {"head": cached_pinv(unembed.detach().T, f"{sha}-head")}
    embedding = loaded.parts.embed.weight
    if not torch.equal(embedding, loaded.parts.lm_head.weight):
        pinvs["embed"] = cached_pinv(embedding.detach().T, f"{sha}-embed")
    return pinvs


def find_tuned_lens(model_dir: str | os.PathLike[str]) -> tuple[Path | None, list[Path]]:
    """The trained tuned lenses of a model in the results tree the model directory belongs to.

    The rule: a model at ``{results}/models/{model}`` has its lenses at ``{results}/lenses/{model}/*.tuned-lens.pt``
    (one per corpus); the first by name is chosen. Returns ``(chosen or None, every candidate)``.
    """
    model = Path(model_dir)
    model = model.resolve() if model.name in ("", ".", "..") else model  # shown as given, where it can be
    folder = model.parent.parent / "lenses" / model.name
    candidates = sorted(folder.glob("*.tuned-lens.pt"))
    return (candidates[0] if candidates else None), candidates


def probe_layers(layers: Sequence[int] | str, n_layers: int, key: str = "--layer") -> list[int]:
    """``all`` or residual layers, each checked against the model's depth."""
    if layers == "all":
        return list(range(n_layers + 1))
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad:
        raise ConfigError(
            f"{key} {' '.join(map(str, bad))}: outside 0..{n_layers} (0 = embeddings, {n_layers} = the last "
            f"of the model's {n_layers} blocks)"
        )
    return list(dict.fromkeys(layers))


def read_texts_file(path: str | os.PathLike[str]) -> list[str]:
    """The texts of a ``--texts-file``: one per line, blank lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--texts-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--texts-file {path} cannot be read as UTF-8 text ({error})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ConfigError(f"--texts-file {path} holds no text: write one text per line")
    return texts


def describe_tuned(chosen: Path | None, candidates: Sequence[Path], reason: str = "") -> str:
    """One line saying which tuned lens is read (or why none is)."""
    if chosen is None:
        return f"tuned lens: none ({reason})" if reason else "tuned lens: none"
    others = [str(path) for path in candidates if path != chosen]
    return f"tuned lens: {chosen}" + (f" (also: {', '.join(others)}; choose with --tuned)" if others else "")


def format_point(point: Mapping[str, Any], k: int = 8) -> str:
    """A text table of one point of :func:`probe_points`: what was read, the model's prediction, each layer."""
    lines = []
    if point.get("text") is not None:
        lines.append(f"text: {point['text']!r}")
        lines.append(
            f"read token {point['token']!r} at position {point['position']} of {point['n_tokens']} tokens; "
            f"the model predicts {format_tokens(point['prediction'], k)}"
        )
    else:
        lines.append(f"vector: {point['vector']}")
    for reading in point["readings"]:
        lines.extend(["", format_reading(reading, k)])
    return "\n".join(lines)


def probe_points(
    loaded: LoadedModel,
    lenses: Mapping[str, Lens],
    texts: Sequence[str],
    layers: Sequence[int],
    position: int = -1,
    k: int = 8,
    targets: Sequence[str] = tuple(TARGET_PROMPTS),
    max_new_tokens: int = 20,
) -> list[dict[str, Any]]:
    """Read each text at ``position`` with every lens and patchscope at each layer (one forward pass per text)."""
    points = []
    for number, text in enumerate(texts, 1):
        try:
            point = read_text(loaded, text, layers, position, k)
        except ConfigError as error:
            raise ConfigError(f"text {number} ({text[:40]!r}): {error}") from None
        readings = [
            read_point(loaded, lenses, point.states[layer], layer, k, targets, max_new_tokens) for layer in layers
        ]
        points.append(
            {
                "text": text,
                "position": point.position,
                "n_tokens": point.n_tokens,
                "token": point.token,
                "prediction": point.prediction,
                "readings": readings,
            }
        )
    return points
