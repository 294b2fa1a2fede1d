"""Batched generation under an intervention, and the scores a steering run needs.

One batch is one prompt continued under every strength of a sweep (rows differ only in their
coefficient), so no row is padded and positions line up, as position-indexed interventions need
(METHODS §0.4). Several prompts may share a batch too, one row each: prompts of one length unpadded, under any
intervention (a sweep batches prompts x samples x strengths so); prompts of several lengths left-padded, positions
counted from each row's first real token, under an intervention that does not index positions. Sampling draws each row
from its own generator, seeded by the caller independently of the batch, so a batched sweep and the same
settings run one by one give the same tokens.

A :class:`StateCapture` keeps, at no extra forward pass, the residual states of the generated tokens at a few
layers: the state at each new token's position, read where the next block reads it (after the intervention's
edit), which is what a re-run of the whole sequence under the same intervention computes.
"""

import contextlib
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import polars as pl
import torch
from torch.nn import functional

from latent_atlas.addresses import resid_address
from latent_atlas.hooks import capture_residuals
from latent_atlas.models import LoadedModel
from latent_atlas.provenance import atomic_output
from latent_atlas.steering.interventions import Intervention, ResidualAddition


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


@dataclass(frozen=True)
class PerRow:
    """A :class:`StateCapture` context label that differs by batch row (one value per row)."""

    values: tuple[Any, ...]


def _label_column(name: str, value: Any, n_rows: int, n_new: int) -> pl.Expr | pl.Series:
    """A context label as a column: one literal, or a :class:`PerRow`'s values (each repeated ``n_new`` times)."""
    if not isinstance(value, PerRow):
        return pl.lit(value)
    if len(value.values) != n_rows:
        raise ValueError(f"{len(value.values)} values of {name!r} for {n_rows} rows")
    dtype = pl.select(pl.lit(value.values[0])).dtypes[0]  # typed as a literal label would be
    return pl.Series(name, np.repeat(np.asarray(value.values), n_new)).cast(dtype)


@dataclass
class StateCapture:
    """Residual states of generated tokens at ``layers``, gathered over :func:`generate` calls.

    Each call adds one record per (row, new token): the row's coefficient, the token, the model's own top-1
    next token read from that state's position (for greedy decoding the next generated token), whether the
    token lies after the row's first EOS, and whatever ``context`` holds at the time (the caller's labels:
    prompt, decoding, sample, steered layer; a :class:`PerRow` label gives each row its own).
    ``states[layer]`` holds one float32 ``(n_new, d)`` block per call.
    """

    layers: tuple[int, ...]
    context: dict[str, Any] = field(default_factory=dict)
    states: dict[int, list[np.ndarray]] = field(default_factory=dict)
    records: list[pl.DataFrame] = field(default_factory=list)

    @contextlib.contextmanager
    def passes(self, loaded: LoadedModel, n_rows: int) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Hook the layers; yield per layer the list of each pass's last-position states ``(n_rows, d)``."""
        by_address = {resid_address(layer): layer for layer in self.layers}
        seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

        def sink(address: str, states: torch.Tensor) -> None:
            seen[by_address[address]].append(states[:, -1].float().cpu())

        with capture_residuals(loaded.parts, self.layers, sink, final_norm=False):
            yield seen

    def add(
        self,
        seen: Mapping[int, list[torch.Tensor]],
        tokens: torch.Tensor,
        top1: torch.Tensor,
        coefficients: Sequence[float],
        eos_id: int | None,
    ) -> None:
        """Keep the states of the new tokens (passes 1..n: pass 0 is the prompt's) with their record rows."""
        n_rows, n_new = tokens.shape
        for layer in self.layers:
            block = torch.stack(seen[layer][1 : n_new + 1], 1)  # (rows, n_new, d)
            self.states.setdefault(layer, []).append(block.reshape(n_rows * n_new, -1).numpy())
        after_eos = torch.zeros_like(tokens, dtype=torch.bool)
        if eos_id is not None:
            is_eos = (tokens == eos_id).long()
            after_eos = (is_eos.cumsum(1) - is_eos) > 0
        record = pl.DataFrame(
            {
                "row": np.repeat(np.arange(n_rows), n_new),
                "coefficient": np.repeat(np.asarray(coefficients, dtype=np.float64), n_new),
                "step": np.tile(np.arange(n_new), n_rows),
                "token_id": tokens.reshape(-1).numpy(),
                "model_top1_id": top1.reshape(-1).numpy(),
                "after_eos": after_eos.reshape(-1).numpy(),
            }
        )
        labels = {key: _label_column(key, value, n_rows, n_new) for key, value in self.context.items()}
        self.records.append(record.with_columns(**labels))

    def table(self) -> pl.DataFrame:
        """Every record, in the order of the stored states (``state`` = the row index into them)."""
        table = pl.concat(self.records, how="diagonal_relaxed") if self.records else pl.DataFrame()
        return table.with_row_index("state").with_columns(pl.col("state").cast(pl.Int64))

    def arrays(self) -> dict[int, np.ndarray]:
        """Per layer, every kept state ``(n_states, d)`` float32."""
        return {layer: np.concatenate(blocks) for layer, blocks in self.states.items()}


def capture_layers(section: Mapping[str, Any]) -> tuple[int, ...]:
    """The layers a sweep keeps states at: the steered layers and ``steering.capture_layers``."""
    return tuple(sorted({*section.get("layers", [6]), *section.get("capture_layers", [])}))


def _left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to one length: ids and attention mask, both ``(rows, T)``."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _indexes_positions(intervention: Intervention | None) -> bool:
    """Whether an intervention edits by position (ActAdd's front, or a start after a prefix)."""
    return isinstance(intervention, ResidualAddition) and (intervention.positions == "front" or intervention.start > 0)


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompt: str | Sequence[int] | Sequence[Sequence[int]],
    intervention: Intervention | None,
    n_rows: int,
    max_new_tokens: int,
    decoding: Decoding = Decoding(),
    row_seeds: Sequence[int] | None = None,
    capture: StateCapture | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (text, or token ids) ``n_rows`` times under ``intervention`` (one coefficient per row).

    ``prompt`` may also be one list of token ids per row (``n_rows`` of them: of one length, any intervention;
    of several, left-padded into one batch, not with a position-indexed intervention). ``capture`` keeps the
    new tokens' states (:class:`StateCapture`).
    Returns the new token ids, ``(n_rows, max_new_tokens)`` (generation does not stop at EOS; callers cut).
    """
    if isinstance(prompt, str):
        prompts = [loaded.tokenizer(prompt)["input_ids"]]
    elif len(prompt) and not isinstance(prompt[0], int):
        prompts = [list(p) for p in prompt]  # type: ignore[arg-type]
    else:
        prompts = [list(prompt)]  # type: ignore[arg-type]
    padded = len(prompts) > 1 and len({len(p) for p in prompts}) > 1
    if len(prompts) > 1 and len(prompts) != n_rows:
        raise ValueError(f"{len(prompts)} prompts for {n_rows} rows; give one prompt, or one per row")
    if padded and _indexes_positions(intervention):
        raise ValueError("a position-indexed intervention needs unpadded rows: batch one prompt at a time")
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    ids, mask = _left_padded(prompts, pad)
    ids, mask = ids.to(loaded.device).expand(n_rows, -1), mask.to(loaded.device).expand(n_rows, -1)
    # unpadded rows run exactly as before (no mask, default positions); padded ones count from the first real token
    extra = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp_min(0)} if padded else {}
    generators = None
    if decoding.sampled:
        seeds = row_seeds if row_seeds is not None else range(n_rows)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    hooks = intervention.attach(loaded.parts) if intervention is not None else contextlib.nullcontext()
    new_tokens, top1 = [], []
    with hooks, capture.passes(loaded, n_rows) if capture is not None else contextlib.nullcontext() as seen:
        if intervention is not None:
            intervention.prompt_pass = True
        output = loaded.model(input_ids=ids, use_cache=True, **extra)
        if intervention is not None:
            intervention.prompt_pass = False
        for _ in range(max_new_tokens):
            top1.append(output.logits[:, -1].argmax(-1))
            token = _choose(output.logits[:, -1], decoding, generators)
            new_tokens.append(token)
            if padded:
                mask = torch.cat([mask, mask.new_ones(n_rows, 1)], 1)
                extra = {"attention_mask": mask, "position_ids": extra["position_ids"][:, -1:] + 1}
            output = loaded.model(
                input_ids=token[:, None], past_key_values=output.past_key_values, use_cache=True, **extra
            )
        if capture is not None:
            top1.append(output.logits[:, -1].argmax(-1))  # the last new token's own next-token choice
            coefficients = intervention.coefficients.expand(n_rows) if intervention is not None else [0.0] * n_rows
            tokens = torch.stack(new_tokens, 1).cpu()
            next_top1 = torch.stack(top1[1:], 1).cpu()
            capture.add(seen, tokens, next_top1, list(map(float, coefficients)), loaded.tokenizer.eos_token_id)
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


def write_states(path: str | os.PathLike[str], capture: StateCapture, meta: Mapping[str, Any]) -> None:
    """Write captured states atomically: ``resid/LL`` float16 ``(n, d)``, the records, and ``meta`` as JSON.

    The records (one per state, in row order) go in as parquet bytes under ``records``; ``meta`` (the
    provenance) under the ``latent_atlas`` attribute.
    """
    buffer = io.BytesIO()
    capture.table().write_parquet(buffer)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as file:
        for layer, states in capture.arrays().items():
            file.create_dataset(f"resid/{layer:02d}", data=states.astype(np.float16))
        file.create_dataset("records", data=np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        file.attrs["latent_atlas"] = json.dumps(dict(meta), default=str)
        file.attrs["layers"] = list(capture.layers)


def read_states(path: str | os.PathLike[str]) -> tuple[pl.DataFrame, dict[int, np.ndarray], dict[str, Any]]:
    """The records, the float32 states per layer and the provenance of a file :func:`write_states` wrote."""
    with h5py.File(path, "r") as file:
        records = pl.read_parquet(io.BytesIO(file["records"][()].tobytes()))
        states = {int(name): file["resid"][name][()].astype(np.float32) for name in file.get("resid", {})}
        meta = json.loads(file.attrs["latent_atlas"])
    return records, states, meta
