"""Batched generation under an intervention, and the scores a steering run needs.

One batch is one prompt continued under every strength of a sweep (rows differ only in their
coefficient), so no row is padded and positions line up, as position-indexed interventions need
(METHODS §0.4). Sampling draws each row from its own generator, seeded by the caller independently of the
batch, so a batched sweep and the same settings run one by one give the same tokens.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional

from latent_atlas.models import LoadedModel
from latent_atlas.steering.interventions import Intervention


@dataclass(frozen=True)
class Decoding:
    """How continuations are chosen: greedy, or sampled with a temperature and nucleus."""

    name: str = "greedy"
    temperature: float = 1.0
    top_p: float = 0.9

    @property
    def sampled(self) -> bool:
        """Whether tokens are drawn at random."""
        return self.name != "greedy"


def _choose(logits: torch.Tensor, decoding: Decoding, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token per row: argmax, or a draw from the temperature-scaled nucleus with the row's generator."""
    if not decoding.sampled:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / decoding.temperature, -1).cpu()
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > decoding.top_p  # keep the smallest set reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    assert generators is not None
    draws = [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(sorted_probs, generators, strict=True)]
    return order.gather(1, torch.tensor(draws)[:, None])[:, 0].to(logits.device)


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompt: str | Sequence[int],
    intervention: Intervention | None,
    n_rows: int,
    max_new_tokens: int,
    decoding: Decoding = Decoding(),
    row_seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (text, or token ids) ``n_rows`` times under ``intervention`` (one coefficient per row).

    Returns the new token ids, ``(n_rows, max_new_tokens)`` (generation does not stop at EOS; callers cut).
    """
    prompt_ids = loaded.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    ids = torch.tensor([prompt_ids], device=loaded.device).expand(n_rows, -1)
    generators = None
    if decoding.sampled:
        seeds = row_seeds if row_seeds is not None else range(n_rows)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    hooks = intervention.attach(loaded.parts) if intervention is not None else contextlib.nullcontext()
    new_tokens = []
    with hooks:
        if intervention is not None:
            intervention.prompt_pass = True
        output = loaded.model(input_ids=ids, use_cache=True)
        if intervention is not None:
            intervention.prompt_pass = False
        for _ in range(max_new_tokens):
            token = _choose(output.logits[:, -1], decoding, generators)
            new_tokens.append(token)
            output = loaded.model(input_ids=token[:, None], past_key_values=output.past_key_values, use_cache=True)
    return torch.stack(new_tokens, 1).cpu()


def cut_at_eos(tokens: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Each row's tokens up to and including the first EOS."""
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row)
    return rows


@torch.no_grad()
def continuation_log_probs(
    loaded: LoadedModel,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    intervention: Intervention | None = None,
) -> list[torch.Tensor]:
    """Log-probability of every token of each continuation given its prompt (teacher forcing, one batch).

    ``prompt_ids`` is one prompt for every row, or one per row. Rows are right-padded; with an
    intervention, row ``i`` gets coefficient ``i``.
    """
    prompts = [list(p) for p in prompt_ids] if prompt_ids and not isinstance(prompt_ids[0], int) else None
    prompts = prompts or [list(prompt_ids)] * len(continuations)  # type: ignore[arg-type]
    lengths = [len(p) + len(c) for p, c in zip(prompts, continuations, strict=True)]
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(continuations), max(lengths)), pad, dtype=torch.long)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        ids[row, : lengths[row]] = torch.tensor([*prompt, *continuation])
    mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    hooks = intervention.attach(loaded.parts) if intervention is not None else contextlib.nullcontext()
    with hooks:
        states = loaded.parts.body(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device))[0]
    # the head reads only the positions that predict a continuation token (not the whole prompt)
    rows = [torch.arange(len(prompt) - 1, lengths[row] - 1) for row, prompt in enumerate(prompts)]
    selected = torch.cat([states[row, positions] for row, positions in enumerate(rows)])
    targets = torch.cat([ids[row, positions + 1] for row, positions in enumerate(rows)])
    log_probs = functional.log_softmax(loaded.parts.lm_head(selected).float(), -1).cpu()
    scores = log_probs.gather(-1, targets[:, None])[:, 0]
    return list(scores.split([len(positions) for positions in rows]))


def perplexity(log_probs: torch.Tensor) -> float:
    """Perplexity: the exponential of the mean negative log-likelihood (nan for an empty continuation)."""
    return float(torch.exp(-log_probs.mean())) if log_probs.numel() else float("nan")


@torch.no_grad()
def off_target_kl(
    loaded: LoadedModel, texts: Sequence[str] | Sequence[Sequence[int]], intervention: Intervention, n_rows: int
) -> torch.Tensor:
    """Mean over positions and texts of KL(p_unsteered ‖ p_steered) of the next token, per row ``(n_rows,)``.

    ``texts`` are strings (tokenised with the tokenizer's defaults) or token ids (e.g. after a prefix).
    """
    totals, count = torch.zeros(n_rows, dtype=torch.float64), 0
    for text in texts:
        encoded = loaded.tokenizer(text)["input_ids"] if isinstance(text, str) else list(text)
        ids = torch.tensor([encoded], device=loaded.device)
        reference = functional.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
        intervention.prompt_pass = True
        with intervention.attach(loaded.parts):
            steered = functional.log_softmax(loaded.model(input_ids=ids.expand(n_rows, -1)).logits.float(), -1)
        kl = (reference.exp() * (reference - steered)).sum(-1)  # (n_rows, T)
        totals += kl.sum(-1).double().cpu()
        count += ids.shape[1]
    return (totals / count).clamp_min(0.0)
