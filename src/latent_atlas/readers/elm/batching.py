"""ELM examples, tokenised around the embedding placeholder and batched with their soft-token slots."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from latent_atlas.errors import ConfigError
from latent_atlas.models import LoadedModel
from latent_atlas.readers.elm.adapter import EmbeddingAdapter

EMBEDDING_PLACEHOLDER = "<embedding>"
CONDITIONS = ("true", "shuffled", "none")
IGNORE_INDEX = -100
_SOFT = -1  # marks a soft-token slot in a row of token ids


# --------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class ElmExample:
    """One task example: row ``embedding_index`` of an embeddings tensor, a prompt with one placeholder, a target."""

    embedding_index: int
    prompt: str
    target: str

    def __post_init__(self) -> None:
        if self.prompt.count(EMBEDDING_PLACEHOLDER) != 1:
            raise ConfigError(
                f"an ELM prompt needs exactly one {EMBEDDING_PLACEHOLDER!r}; {self.prompt!r} has "
                f"{self.prompt.count(EMBEDDING_PLACEHOLDER)}"
            )


def make_examples(indices: Sequence[int], targets: Sequence[str], prompt: str) -> list[ElmExample]:
    """One example per (embedding row, target) pair, all with the same prompt template (one task)."""
    return [ElmExample(int(i), prompt, t) for i, t in zip(indices, targets, strict=True)]


def leading_tokens(tokenizer: Any, texts: Sequence[str], n_tokens: int) -> list[str]:
    """Reconstruction targets: each text's first ``n_tokens`` tokens, decoded, with a leading space.

    The space makes the target tokenise as the continuation of a prompt that ends in a word or colon.
    """
    targets = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
        targets.append(" " + tokenizer.decode(ids, skip_special_tokens=True).strip())
    return targets


# --------------------------------------------------------------------------------------------------
# Tokenising and batching


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of an example's pieces: before the placeholder (with BOS if any), after it, the target (+EOS)."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    target: tuple[int, ...]

    def row(self, n_soft: int | None) -> list[int]:
        """The ids of the prompt and target with ``n_soft`` soft slots (``None``: the placeholder removed)."""
        soft = [_SOFT] * n_soft if n_soft is not None else []
        return [*self.before, *soft, *self.after, *self.target]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS in front of plain text (e.g. Gemma's does, SmolLM2's does not)."""
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _piece_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a piece of text, with no special tokens (empty text: no ids)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_example(tokenizer: Any, prompt: str, target: str = "", end_with_eos: bool = True) -> EncodedExample:
    """Tokenise a prompt's pieces around the placeholder and the target, with no special tokens in between.

    ``end_with_eos`` appends the EOS to a non-empty target, so a trained ELM learns where to stop.
    """
    before, after = prompt.split(EMBEDDING_PLACEHOLDER) if EMBEDDING_PLACEHOLDER in prompt else (prompt, "")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    target_ids = _piece_ids(tokenizer, target)
    if target_ids and end_with_eos and tokenizer.eos_token_id is not None:
        target_ids.append(tokenizer.eos_token_id)
    return EncodedExample(
        tuple(bos + _piece_ids(tokenizer, before)), tuple(_piece_ids(tokenizer, after)), tuple(target_ids)
    )


def encode_examples(tokenizer: Any, examples: Sequence[ElmExample]) -> list[EncodedExample]:
    """:func:`encode_example` of every example (each distinct prompt and target tokenised once)."""
    cache: dict[tuple[str, str], EncodedExample] = {}
    encoded = []
    for example in examples:
        key = (example.prompt, example.target)
        if key not in cache:
            cache[key] = encode_example(tokenizer, example.prompt, example.target)
        encoded.append(cache[key])
    return encoded


def shuffled_rows(indices: Sequence[int], seed: int) -> list[int]:
    """A seeded derangement of embedding rows: index ``u`` → ``π(u)`` with ``π`` one cycle over the distinct rows.

    Examples sharing an embedding row move together, and no example keeps its own row (Sattolo's algorithm).
    """
    distinct = sorted(set(int(i) for i in indices))
    if len(distinct) < 2:
        raise ConfigError("the shuffled condition needs examples with at least two different embeddings")
    rng = np.random.default_rng(seed)
    cycle = list(range(len(distinct)))
    for i in range(len(cycle) - 1, 0, -1):
        j = int(rng.integers(0, i))
        cycle[i], cycle[j] = cycle[j], cycle[i]
    mapping = {distinct[k]: distinct[cycle[k]] for k in range(len(distinct))}
    return [mapping[int(i)] for i in indices]


def condition_rows(examples: Sequence[ElmExample], condition: str, seed: int = 0) -> list[int] | None:
    """The embedding row each example reads under ``condition`` (``None`` for ``none``: no soft token)."""
    if condition not in CONDITIONS:
        raise ConfigError(f"unknown ELM condition {condition!r}; use one of {', '.join(CONDITIONS)}")
    indices = [example.embedding_index for example in examples]
    if condition == "none":
        return None
    return indices if condition == "true" else shuffled_rows(indices, seed)


@dataclass
class ElmBatch:
    """Model inputs with the soft tokens spliced in, right-padded.

    Attributes:
        inputs_embeds: ``(B, T, d)``.
        attention_mask: ``(B, T)``, 1 on real positions.
        labels: ``(B, T)``, the token id at target positions and ``IGNORE_INDEX`` elsewhere (HF convention:
            position ``t`` is predicted from position ``t - 1``).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def _pad_id(tokenizer: Any) -> int:
    """The id used for padding (never attended to)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def embed_rows(
    loaded: LoadedModel, rows: Sequence[Sequence[int]], soft: torch.Tensor | None, left_pad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed padded rows of ids and put ``soft`` ``(B, n_soft, d)`` at their ``_SOFT`` slots, in order.

    Returns ``inputs_embeds`` ``(B, T, d)`` and ``attention_mask`` ``(B, T)``.
    """
    width = max(len(row) for row in rows)
    pad = _pad_id(loaded.tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = width - len(row) if left_pad else 0
        ids[r, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, start : start + len(row)] = 1
    slots = (ids == _SOFT).to(loaded.device)
    embeds = loaded.parts.embed(ids.masked_fill(ids == _SOFT, pad).to(loaded.device))
    n_slots = int(slots.sum())
    expected = 0 if soft is None else soft.shape[0] * soft.shape[1]
    if n_slots != expected:
        raise ValueError(f"{n_slots} soft-token slots in the batch but {expected} soft tokens given")
    if soft is not None:
        flat = soft.reshape(-1, soft.shape[-1]).to(embeds.dtype)
        placed = torch.zeros_like(embeds).index_put(tuple(slots.nonzero().T), flat)
        embeds = torch.where(slots[..., None], placed, embeds)
    return embeds, mask.to(loaded.device)


def build_batch(loaded: LoadedModel, encoded: Sequence[EncodedExample], soft: torch.Tensor | None) -> ElmBatch:
    """Right-padded inputs of ``encoded`` examples with ``soft`` ``(B, n_soft, d)`` at the placeholder.

    ``soft=None`` removes the placeholder (the ``none`` condition): every row is ``n_soft`` positions shorter.
    """
    n_soft = None if soft is None else soft.shape[1]
    rows = [example.row(n_soft) for example in encoded]
    embeds, mask = embed_rows(loaded, rows, soft)
    labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.long)
    for r, (row, example) in enumerate(zip(rows, encoded, strict=True)):
        start = len(row) - len(example.target)
        labels[r, start : len(row)] = torch.tensor(example.target, dtype=torch.long)
    return ElmBatch(embeds, mask, labels.to(loaded.device))


def soft_tokens(
    adapter: EmbeddingAdapter | None, embeddings: torch.Tensor | None, rows: Sequence[int] | None
) -> torch.Tensor | None:
    """The adapter's soft tokens for the given rows of ``embeddings`` (``None`` when ``rows`` is ``None``)."""
    if rows is None:
        return None
    if adapter is None or embeddings is None:
        raise ValueError("soft tokens need both an adapter and embeddings")
    return adapter(embeddings[torch.as_tensor(list(rows), dtype=torch.long)])


def head_logits(loaded: LoadedModel, states: torch.Tensor) -> torch.Tensor:
    """Logits of post-final-norm states: ``parts.lm_head`` applies the model's own scaling and soft-cap (Gemma 2)."""
    return loaded.parts.lm_head(states)


def example_nll(loaded: LoadedModel, batch: ElmBatch) -> torch.Tensor:
    """Mean NLL (nats per token) of each row's target tokens ``(B,)``; the head reads only target positions."""
    output = loaded.parts.body(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=False)
    states = output[0]  # post-final-norm states (B, T, d)
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows, cols = scored.nonzero(as_tuple=True)
    logits = head_logits(loaded, states[:, :-1][rows, cols]).float()
    nll = functional.cross_entropy(logits, targets[rows, cols], reduction="none")
    totals = torch.zeros(len(targets), device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
    return totals / scored.sum(1).clamp_min(1)
