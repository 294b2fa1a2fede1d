"""The ELM adapter: token-embedding norms, the MLP that maps a domain embedding to soft tokens, saving and loading."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from latent_atlas.errors import ConfigError, LatentAtlasError
from latent_atlas.models import LoadedModel, ModelParts
from latent_atlas.provenance import atomic_output

# --------------------------------------------------------------------------------------------------
# Token-embedding norms and the adapter


@dataclass(frozen=True)
class EmbeddingNorms:
    """Statistics of ‖embed(t)‖ over the whole vocabulary (the embedding module's output, scale included)."""

    median: float
    minimum: float
    maximum: float


@torch.no_grad()
def embedding_norms(parts: ModelParts, chunk_size: int = 8192) -> EmbeddingNorms:
    """Median, min and max L2 norm of ``parts.embed(t)`` over every token id ``t`` (in chunks)."""
    vocab = int(parts.embed.weight.shape[0])
    device = parts.embed.weight.device
    norms = torch.cat(
        [
            parts.embed(torch.arange(start, min(start + chunk_size, vocab), device=device)).float().norm(dim=-1).cpu()
            for start in range(0, vocab, chunk_size)
        ]
    )
    return EmbeddingNorms(float(norms.median()), float(norms.min()), float(norms.max()))


def typical_embedding_norm(parts: ModelParts) -> float:
    """The median L2 norm of the embedding module's output over the vocabulary: the soft tokens' norm."""
    return embedding_norms(parts).median


class EmbeddingAdapter(nn.Module):
    """E_A: w ``(n, d_w)`` → ``n_soft`` soft tokens ``(n, n_soft, d_model)``, each of norm ``target_norm``.

    An MLP ``d_w → hidden → n_soft·d_model`` (GELU) on standardised inputs, ``(w - mean) / scale`` (identity
    until :meth:`standardise_inputs` is called: residual states have a few huge dimensions that would
    otherwise dominate), then each soft token is rescaled: ``target_norm · v / ‖v‖``.
    """

    def __init__(
        self, d_w: int, d_model: int, target_norm: float, n_soft: int = 1, hidden: int = 1024, seed: int = 0
    ) -> None:
        super().__init__()
        if min(d_w, d_model, n_soft, hidden) < 1 or not target_norm > 0:
            raise ConfigError(
                f"ELM adapter sizes must be ≥ 1 and target_norm > 0; got d_w={d_w}, d_model={d_model}, "
                f"n_soft={n_soft}, hidden={hidden}, target_norm={target_norm}"
            )
        self.d_w, self.d_model, self.n_soft, self.hidden = d_w, d_model, n_soft, hidden
        self.target_norm, self.seed = float(target_norm), seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(d_w, hidden), nn.GELU(), nn.Linear(hidden, n_soft * d_model))
        self.register_buffer("input_mean", torch.zeros(d_w))
        self.register_buffer("input_scale", torch.ones(d_w))

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, d_w: int, n_soft: int = 1, hidden: int = 1024, seed: int = 0
    ) -> "EmbeddingAdapter":
        """An adapter into ``loaded``'s embedding space, its norm the model's typical token-embedding norm."""
        adapter = cls(d_w, loaded.d_model, typical_embedding_norm(loaded.parts), n_soft, hidden, seed)
        return adapter.to(loaded.device)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (saved with the weights)."""
        return {
            "d_w": self.d_w,
            "d_model": self.d_model,
            "target_norm": self.target_norm,
            "n_soft": self.n_soft,
            "hidden": self.hidden,
            "seed": self.seed,
        }

    @torch.no_grad()
    def standardise_inputs(self, embeddings: torch.Tensor) -> "EmbeddingAdapter":
        """Set the input standardisation to the per-dimension mean and std of ``embeddings`` ``(n, d_w)``."""
        values = embeddings.to(self.input_mean.device, torch.float32)
        self.input_mean.copy_(values.mean(0))
        if len(values) > 1:
            self.input_scale.copy_(values.std(0, correction=0).clamp_min(1e-6))
        return self

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Soft tokens ``(n, n_soft, d_model)`` of embeddings ``w`` ``(n, d_w)``, each of norm ``target_norm``."""
        x = (w.to(self.input_mean.device, torch.float32) - self.input_mean) / self.input_scale
        out = self.net(x).reshape(len(w), self.n_soft, self.d_model)
        return self.target_norm * functional.normalize(out, dim=-1)


# --------------------------------------------------------------------------------------------------
# Saving and loading


def model_fingerprint(loaded: LoadedModel) -> str:
    """The model's weights hash from its manifest, else a hash of its input-embedding matrix."""
    recorded = loaded.manifest.get("weights_sha256")
    if recorded:
        return str(recorded)
    weight = loaded.parts.embed.weight.detach().to(torch.float32).cpu().numpy()
    return "embed:" + hashlib.sha256(weight.tobytes()).hexdigest()[:16]


def save_adapter(
    path: str | os.PathLike[str], adapter: EmbeddingAdapter, loaded: LoadedModel, meta: dict[str, Any] | None = None
) -> None:
    """Write the adapter's weights, constructor arguments, the model's d_model and fingerprint, and ``meta``.

    One file, written atomically. After stage 2 the LM differs from the fingerprinted base model: save it too.
    """
    record = {
        "adapter": adapter.config,
        "d_model": loaded.d_model,
        "model_fingerprint": model_fingerprint(loaded),
        "meta": meta or {},
    }
    state = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
    with atomic_output(path) as tmp:
        torch.save({"record": json.dumps(record, default=str), "state": state}, tmp)


def read_adapter_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What :func:`save_adapter` recorded: constructor arguments, ``d_model``, ``model_fingerprint``, ``meta``."""
    if not Path(path).is_file():
        raise LatentAtlasError(f"no ELM adapter at {path}; train it first (snakemake {path})")
    return json.loads(torch.load(path, weights_only=True, map_location="cpu")["record"])


def load_adapter(path: str | os.PathLike[str], loaded: LoadedModel) -> tuple[EmbeddingAdapter, dict[str, Any]]:
    """Load an adapter for ``loaded``, refusing one trained for another width or another model.

    Returns:
        The adapter (eval mode, on the model's device) and the ``meta`` saved with it.
    """
    saved = torch.load(path, weights_only=True, map_location="cpu") if Path(path).is_file() else None
    if saved is None:
        raise LatentAtlasError(f"no ELM adapter at {path}; train it first (snakemake {path})")
    record = json.loads(saved["record"])
    if record["d_model"] != loaded.d_model:
        raise LatentAtlasError(
            f"the ELM adapter in {path} makes soft tokens of width d_model={record['d_model']}, but this model "
            f"has d_model={loaded.d_model}; it was trained for another model: retrain it"
        )
    if record["model_fingerprint"] != model_fingerprint(loaded):
        raise LatentAtlasError(
            f"the ELM adapter in {path} was trained with another model (fingerprint {record['model_fingerprint']}, "
            f"this model's {model_fingerprint(loaded)}); retrain it"
        )
    adapter = EmbeddingAdapter(**record["adapter"])
    adapter.load_state_dict(saved["state"])
    return adapter.to(loaded.device).eval(), record["meta"]
