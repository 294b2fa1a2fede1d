"""Patchscopes (Ghandeharioun et al. 2024; METHODS §5): decode a state by transplanting it into a prompt.

A state taken at ``resid.{layer}`` (the output of block ``layer``; 0 = embedding output) overwrites the
same address of a target prompt at one position, in the prompt pass only (later generation steps, which
read the KV cache with sequence length 1, are left alone); the model then continues greedily.
"""

import contextlib
from dataclasses import dataclass

import torch

from latent_atlas.hooks import capture_residuals, edit_residual
from latent_atlas.models import LoadedModel, ModelParts

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
ENTITY_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)
TARGET_PROMPTS = {"identity": IDENTITY_PROMPT, "entity_description": ENTITY_PROMPT}


def resolve_position(position: int, length: int) -> int:
    """A position in a sequence of ``length`` tokens; negative counts from the end."""
    resolved = position + length if position < 0 else position
    if not 0 <= resolved < length:
        raise ValueError(f"position {position} is outside a prompt of {length} tokens")
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
