"""Patchscopes (Ghandeharioun et al. 2024; METHODS §5): decode a state by transplanting it into a prompt.

A state taken at ``resid.{layer}`` (the output of block ``layer``; 0 = embedding output) overwrites the
same address of a target prompt at one position, in the prompt pass only (later generation steps, which
read the KV cache with sequence length 1, are left alone); the model then continues greedily.

:class:`IdentityPatchscope` is the paper's next-token evaluation as a lens: a state at ``resid.{layer}`` is
patched into the last position of the identity prompt at the same layer, and the patched next-token logits
are its reading; the lens evaluation then scores Precision@1 and surprisal against the model's own
prediction at the source position (official code: ``evaluate_patch_next_token_prediction``).
"""

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch

from latent_atlas.errors import ConfigError
from latent_atlas.hooks import capture_residuals, edit_residual
from latent_atlas.lenses.base import Lens, Readout, head_readout
from latent_atlas.models import LoadedModel, ModelParts

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
ENTITY_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)
TARGET_PROMPTS = {"identity": IDENTITY_PROMPT, "entity_description": ENTITY_PROMPT}


def resolve_position(position: int, length: int) -> int:
    """A position in a sequence of ``length`` tokens; negative counts from the end.

    Raises:
        ConfigError: (a ``ValueError``) for an empty text or a position outside it, naming the valid range.
    """
    if length == 0:
        raise ConfigError("the text is empty (0 tokens): give a text of at least one token")
    resolved = position + length if position < 0 else position
    if not 0 <= resolved < length:
        raise ConfigError(
            f"position {position} is outside a text of {length} tokens: use {-length}..{length - 1} (-1 = last)"
        )
    return resolved


@torch.no_grad()
def residual_state(loaded: LoadedModel, text: str, layer: int, position: int = -1) -> torch.Tensor:
    """Return ``resid.{layer}`` of ``text`` at ``position`` (float32, shape ``(d,)``)."""
    encoded = loaded.tokenizer(text, return_tensors="pt").to(loaded.device)
    index = resolve_position(position, encoded["input_ids"].shape[1])
    captured: dict[str, torch.Tensor] = {}
    with capture_residuals(loaded.parts, [layer], lambda _, states: captured.update(h=states), final_norm=False):
        loaded.parts.body(**encoded, use_cache=False)
    return captured["h"][0, index].float()


def patch_residual(
    parts: ModelParts, layer: int, position: int, vector: torch.Tensor
) -> contextlib.AbstractContextManager:
    """Overwrite ``resid.{layer}`` at ``position`` with ``vector`` in every pass long enough to hold it.

    ``vector`` is ``(d,)`` (every row) or ``(B, d)`` (one per row).
    """

    def replace(states: torch.Tensor) -> torch.Tensor:
        if states.shape[1] > position:
            states = states.clone()
            states[:, position] = vector.to(states.dtype)
        return states

    return edit_residual(parts, layer, replace)


@dataclass(frozen=True)
class PatchscopeReading:
    """What a patchscope made of a state: the patched next-token distribution and a greedy continuation."""

    target: str
    layer: int
    next_token_ids: list[int]
    next_token_probs: list[float]
    generated: str


@torch.no_grad()
def patchscope(
    loaded: LoadedModel,
    vector: torch.Tensor,
    layer: int,
    target_prompt: str = IDENTITY_PROMPT,
    position: int = -1,
    max_new_tokens: int = 20,
    k: int = 10,
) -> PatchscopeReading:
    """Patch ``vector`` into ``resid.{layer}`` of the target prompt at ``position`` and decode greedily."""
    encoded = loaded.tokenizer(target_prompt, return_tensors="pt").to(loaded.device)
    index = resolve_position(position, encoded["input_ids"].shape[1])
    with patch_residual(loaded.parts, layer, index, vector.to(loaded.device)):
        logits = loaded.model(**encoded, use_cache=False).logits[0, -1]
        generated = loaded.model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id,
        )
    probs, ids = torch.softmax(logits.float(), -1).topk(k)
    text = loaded.tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return PatchscopeReading(target_prompt, layer, ids.tolist(), probs.tolist(), text)


@torch.no_grad()
def patched_last_logits(
    loaded: LoadedModel, target_ids: torch.Tensor, layer: int, states: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Next-token logits at the last position of a target prompt whose ``resid.{layer}`` there is each state.

    The model's head (with its own post-head transform) read on :func:`patched_last_states`: ``(N, V)`` float32.
    """
    hidden = patched_last_states(loaded, target_ids, layer, states, batch_size)
    return loaded.parts.lm_head(hidden).float().cpu()


@torch.no_grad()
def patched_last_states(
    loaded: LoadedModel, target_ids: torch.Tensor, layer: int, states: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """The post-final-norm state at the last position of a target prompt whose ``resid.{layer}`` there is each state.

    Patching the last position never reaches earlier ones (attention is causal), and below ``layer`` the last
    token's computation is the same for every state. So the prompt's prefix is run once for its KV cache,
    and each batch runs the last token alone, as one row up to ``resid.{layer}``, where the row is replaced
    by the batch of states (the caches of the blocks above are repeated to the batch): one reading costs
    the blocks above ``layer`` for one token.

    Args:
        loaded: the model.
        target_ids: the target prompt's token ids, shape ``(T,)``; the state replaces position T-1.
        layer: the residual layer patched (0 = embedding output .. L = last block output).
        states: the states to patch in, shape ``(N, d)``.
        batch_size: rows run at once.

    Returns:
        States of shape ``(N, d)`` (float32, on the model's device): what the model's head reads.
    """
    device, body = loaded.device, loaded.parts.body
    target_ids = target_ids.to(device)
    cache_argument = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    prefix_cache = None
    if len(target_ids) > 1:
        prefix = loaded.model(input_ids=target_ids[None, :-1], use_cache=True)
        prefix_cache = getattr(prefix, "cache", None) or prefix.past_key_values
    outputs = []
    for start in range(0, len(states), batch_size):
        batch = states[start : start + batch_size].to(device=device, dtype=torch.float32)
        cache = copy.deepcopy(prefix_cache)
        if cache is not None:
            for block, cached in enumerate(cache.layers):
                if block >= layer:  # blocks layer+1.. (0-based index >= layer) read the patched batch
                    cached.batch_repeat_interleave(len(batch))

        def widen(single: torch.Tensor, batch: torch.Tensor = batch) -> torch.Tensor:
            if single.shape[:2] != (1, 1):
                raise RuntimeError(f"expected the last token alone at resid.{layer}, got {tuple(single.shape)}")
            return batch[:, None, :].to(single.dtype)

        with edit_residual(loaded.parts, layer, widen):
            hidden = body(input_ids=target_ids[-1:].view(1, 1), use_cache=True, **{cache_argument: cache})
        outputs.append(hidden.last_hidden_state[:, -1].float())
    return torch.cat(outputs) if outputs else torch.empty(0, loaded.d_model, device=device)


class IdentityPatchscope(Lens):
    """The token-identity patchscope read as a lens: ℓ* = ℓ, i* = the target prompt's last token.

    ``logits(h, layer)`` runs the model once per state (batched), so it is far dearer than a vocabulary lens.
    """

    def __init__(self, loaded: LoadedModel, target_prompt: str = IDENTITY_PROMPT, batch_size: int = 256) -> None:
        """Tokenise the target prompt (with the tokenizer's own special tokens, as the source text was)."""
        super().__init__()
        self.name = "patchscope_identity"
        self.loaded = loaded
        self.target_ids = loaded.tokenizer(target_prompt, return_tensors="pt")["input_ids"][0]
        self.batch_size = batch_size

    def reads(self, layer: int) -> bool:
        """Every residual layer 0..L."""
        return 0 <= layer <= self.loaded.n_layers

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Patched next-token logits, shape ``(..., V)``, for states ``(..., d)``."""
        flat = h.reshape(-1, h.shape[-1])
        logits = patched_last_logits(self.loaded, self.target_ids, layer, flat, self.batch_size)
        return logits.reshape(*h.shape[:-1], logits.shape[-1])

    def readout(self, layer: int) -> Readout | None:
        """The model's head with its post-head transform (None for a head that is not a linear layer)."""
        return head_readout(self.loaded.parts.lm_head)

    def hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The patched prompt's last post-final-norm state, ``(..., d)``, for states ``(..., d)``."""
        flat = h.reshape(-1, h.shape[-1])
        hidden = patched_last_states(self.loaded, self.target_ids, layer, flat, self.batch_size)
        return hidden.reshape(*h.shape[:-1], hidden.shape[-1])
