"""Generation from prompts with soft tokens, and the judge's semantic consistency."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

from latent_atlas.errors import ConfigError
from latent_atlas.models import LoadedModel
from latent_atlas.readers.elm.adapter import EmbeddingAdapter
from latent_atlas.readers.elm.batching import embed_rows, encode_example, head_logits

# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class PromptInputs:
    """Left-padded prompt inputs for generation: ``inputs_embeds`` ``(B, T, d)``, mask and positions ``(B, T)``."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def _prompts(prompt: str | Sequence[str], n_rows: int) -> list[str]:
    """One prompt per row."""
    prompts = [prompt] * n_rows if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n_rows:
        raise ValueError(f"{len(prompts)} prompts for {n_rows} embeddings")
    return prompts


def prompt_inputs(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter | None,
    embeddings: torch.Tensor | None,
    prompts: Sequence[str],
) -> PromptInputs:
    """Left-padded prompts with the soft tokens of ``embeddings`` ``(B, d_w)`` (``None``: placeholder removed).

    Positions count real tokens only, so a padded row is computed as it would be alone.
    """
    encoded = [encode_example(loaded.tokenizer, p) for p in prompts]
    soft = None
    if embeddings is not None:
        if adapter is None:
            raise ValueError("generating from embeddings needs an adapter")
        soft = adapter(embeddings)
    rows = [e.row(None if soft is None else soft.shape[1]) for e in encoded]
    embeds, mask = embed_rows(loaded, rows, soft, left_pad=True)
    return PromptInputs(embeds, mask, (mask.cumsum(1) - 1).clamp_min(0))


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Text of generated ids, cut before the first EOS."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _generate_batch(loaded: LoadedModel, inputs: PromptInputs, max_new_tokens: int) -> list[list[int]]:
    """Greedy ids for one batch with the KV cache; finished rows are fed EOS until every row is done."""
    eos = loaded.tokenizer.eos_token_id
    mask, positions = inputs.attention_mask, inputs.position_ids
    output = loaded.parts.body(
        inputs_embeds=inputs.inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True
    )
    finished = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = head_logits(loaded, output[0][:, -1]).argmax(-1)
        if eos is not None:
            token = token.masked_fill(finished, eos)
            finished |= token == eos
        tokens.append(token)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        output = loaded.parts.body(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=output.past_key_values,
            use_cache=True,
        )
    return torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(len(mask))]


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    adapter: EmbeddingAdapter | None,
    embeddings: torch.Tensor | None,
    prompt: str | Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of ``prompt`` with each embedding row as soft tokens, stopping at EOS per row.

    Args:
        loaded: the LM.
        adapter: the trained adapter (unused when ``embeddings`` is ``None``).
        embeddings: any points ``(n, d_w)`` (held-out, interpolated, moved along a direction), or ``None`` for
            the no-embedding condition (the placeholder removed).
        prompt: one prompt for every row, or one per row (rows are left-padded, positions per row).
        max_new_tokens: the most tokens generated per row.
        batch_size: rows per forward pass.

    Returns:
        One string per row (one for ``embeddings=None`` with a single prompt), without the EOS.
    """
    n_rows = len(embeddings) if embeddings is not None else (1 if isinstance(prompt, str) else len(prompt))
    prompts = _prompts(prompt, n_rows)
    if adapter is not None:
        adapter.eval()
    texts = []
    for start in range(0, n_rows, batch_size):
        chunk = embeddings[start : start + batch_size].to(loaded.device) if embeddings is not None else None
        inputs = prompt_inputs(loaded, adapter, chunk, prompts[start : start + batch_size])
        texts += [_decode(loaded.tokenizer, ids) for ids in _generate_batch(loaded, inputs, max_new_tokens)]
    return texts


# --------------------------------------------------------------------------------------------------
# Judge: semantic consistency


@torch.no_grad()
def mean_pooled_states(
    loaded: LoadedModel, texts: Sequence[str], layer: int, batch_size: int = 16, skip_first: bool = True
) -> torch.Tensor:
    """Mean over each text's tokens of ``resid.{layer}`` (``hidden_states[layer]``), padding masked out.

    ``skip_first`` leaves out position 0 (the BOS, or the first token: an attention sink with a huge norm
    that would dominate every cosine, METHODS §0.4) unless it is the only token. ``hidden_states[L]`` is
    post-final-norm (METHODS §0.2). Texts with no token give a row of NaN. Returns ``(n, d)`` float32 on CPU.
    """
    if not 0 <= layer <= loaded.n_layers:
        raise ConfigError(f"layer {layer} is outside 0..{loaded.n_layers} of this model")
    ids = [list(loaded.tokenizer(text)["input_ids"]) for text in texts]
    pooled = torch.full((len(texts), loaded.d_model), float("nan"))
    present = [i for i, row in enumerate(ids) if row]
    for start in range(0, len(present), batch_size):
        chosen = present[start : start + batch_size]
        rows = [ids[i] for i in chosen]
        embeds, mask = embed_rows(loaded, rows, None)
        states = loaded.parts.body(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        weights = mask.float()
        if skip_first:
            weights[:, 0] = torch.where(mask.sum(1) > 1, 0.0, weights[:, 0])
        hidden = states.hidden_states[layer].float()
        means = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        pooled[chosen] = means.cpu()
    return pooled


def semantic_consistency(generated_vectors: torch.Tensor, reference_vectors: torch.Tensor) -> torch.Tensor:
    """Cosine between each generated text's judge vector and its reference's, ``(n,)`` (NaN for NaN rows)."""
    if generated_vectors.shape != reference_vectors.shape:
        raise ValueError(f"shapes differ: {tuple(generated_vectors.shape)} vs {tuple(reference_vectors.shape)}")
    return functional.cosine_similarity(generated_vectors.double(), reference_vectors.double(), dim=-1)
