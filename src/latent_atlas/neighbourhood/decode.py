"""Decode many states at once and compare each with a reference state's decoding.

A *decoder* turns states at ``resid.{layer}`` into next-token logits: a vocabulary lens (logit, tuned,
semantic basis), or ``model``: the model itself, continuing the forward pass from ``layer`` with the
state patched into a context at one position (the model's own next-token distribution at that position).
The reference is decoded in the same batch as the states (row 0), so a state equal to the reference
gets exactly the reference's distribution.
"""

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from latent_atlas.lenses.base import Lens
from latent_atlas.lenses.patchscope import IDENTITY_PROMPT, patch_residual, resolve_position
from latent_atlas.models import LoadedModel

MODEL_DECODER = "model"


@dataclass(frozen=True)
class Context:
    """Where the ``model`` decoder patches a state (``position``) and reads the next-token distribution.

    ``read_position`` defaults to the patched position: the model's own prediction of the next token there.
    """

    text: str
    position: int = -1
    read_position: int | None = None

    @classmethod
    def identity(cls, tokenizer: PreTrainedTokenizerBase) -> "Context":
        """The patchscope identity prompt, its placeholder patched, read after the following ``->``.

        The prompt ends with the placeholder ``?``; appending `` ->`` makes the next token the model's
        rendering of the patched state (without it the next token is always ``->``).
        """
        placeholder = len(tokenizer(IDENTITY_PROMPT)["input_ids"]) - 1
        return cls(f"{IDENTITY_PROMPT} ->", placeholder, -1)


@torch.no_grad()
def lens_logits(lens: Lens, states: torch.Tensor, layer: int, chunk: int = 256) -> torch.Tensor:
    """Logits ``(S, V)`` of a lens for states ``(S, d)``, computed ``chunk`` rows at a time."""
    return torch.cat([lens.logits(part, layer).float() for part in states.split(chunk)])


@torch.no_grad()
def model_logits(
    loaded: LoadedModel, states: torch.Tensor, layer: int, context: Context, chunk: int = 32
) -> torch.Tensor:
    """The model's next-token logits ``(S, V)`` at the read position, each state patched at ``resid.{layer}``."""
    ids = loaded.tokenizer(context.text, return_tensors="pt")["input_ids"][0]
    index = resolve_position(context.position, len(ids))
    read = index if context.read_position is None else resolve_position(context.read_position, len(ids))
    if read < index:
        raise ValueError(f"the read position {read} comes before the patched position {index}")
    prefix = ids[: read + 1].to(loaded.device)  # later tokens cannot change the logits at `read`
    outputs = []
    for part in states.split(chunk):
        batch = prefix.expand(len(part), -1)
        with patch_residual(loaded.parts, layer, index, part.to(loaded.device)):
            logits = loaded.model(input_ids=batch, use_cache=False).logits[:, read]
        outputs.append(logits.float().cpu())
    return torch.cat(outputs)


def compare_with_reference(reference: torch.Tensor, logits: torch.Tensor, k: int = 10) -> dict[str, np.ndarray]:
    """Per-row metrics of ``logits (S, V)`` against ``reference (V,)``.

    Returns ``top1_id``, ``top1_prob``, ``top1_retained`` (same top token as the reference),
    ``jaccard_topk`` (|A∩B| / |A∪B| of the top-k sets), ``kl_to_reference`` = KL(p_ref ‖ p) in nats, and
    ``entropy`` of p in nats.
    """
    log_p = torch.log_softmax(logits.float(), -1)
    log_ref = torch.log_softmax(reference.float(), -1)
    top1_prob, top1 = log_p.max(-1)
    top_k = log_p.topk(k, -1).indices
    reference_top_k = log_ref.topk(k).indices
    shared = torch.isin(top_k, reference_top_k).sum(-1).double()
    kl = (log_ref.exp() * (log_ref - log_p)).sum(-1, dtype=torch.float64)
    entropy = -(log_p.exp() * log_p).sum(-1, dtype=torch.float64)
    return {
        "top1_id": top1.numpy().astype(np.int64),
        "top1_prob": top1_prob.exp().double().numpy(),
        "top1_retained": (top1 == log_ref.argmax()).numpy(),
        "jaccard_topk": (shared / (2 * k - shared)).numpy(),
        "kl_to_reference": kl.clamp_min(0.0).numpy(),
        "entropy": entropy.numpy(),
    }


def decode_against_reference(
    decoder: Lens | LoadedModel,
    reference: torch.Tensor,
    states: torch.Tensor,
    layer: int,
    k: int = 10,
    context: Context | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Decode ``states (S, d)`` and the reference ``(d,)`` in one batch and compare them.

    ``context`` is where the ``model`` decoder patches (default: the identity prompt); ``device`` is where
    lenses run.
    """
    stacked = torch.cat([reference[None], states]).float()
    if isinstance(decoder, LoadedModel):
        logits = model_logits(decoder, stacked, layer, context or Context.identity(decoder.tokenizer))
    else:
        logits = lens_logits(decoder, stacked.to(device), layer).cpu()
    return compare_with_reference(logits[0], logits[1:], k)
