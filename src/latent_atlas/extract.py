"""Activation extraction: batched body-only forward passes with hooks, streamed into an HDF5 store.

Documents are tokenised once, sorted by length and packed into right-padded batches under a token
budget; each hooked state is reduced to its real (unpadded, selected) rows, cast to the store dtype and
written straight into preallocated datasets, so memory is bounded by one batch and never grows with the
corpus. The LM head is never run: extraction needs no logits.
"""

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from latent_atlas.config import LayerSpec, select_layers
from latent_atlas.corpus import load_corpus_table
from latent_atlas.errors import ConfigError, StoreError
from latent_atlas.hooks import capture_residuals
from latent_atlas.models import LoadedModel, load_model
from latent_atlas.provenance import code_version, execution_context, utc_now
from latent_atlas.store import STORE_DTYPES, StoreWriter


@dataclass(frozen=True)
class ExtractionSettings:
    """What to extract and how (the ``extraction`` section of the config).

    ``model_dtype`` is what the forward passes compute in: ``float32`` (the default), or ``auto`` for bfloat16
    on a CUDA device (float32 on the CPU; :func:`latent_atlas.models.resolve_model_dtype`). The store records
    the resolved dtype in ``attrs["model_dtype"]``. bfloat16 is opt-in, not the default: its ~3 significant
    digits per state compound over the blocks, so a store would depend on the hardware that made it, and the
    analyses that read the small end of spectra (effective rank, IsoScore) or compare the last layer's lens
    with the stored final state would see that noise.
    """

    layers: LayerSpec = "all"
    dtype: str = "float16"
    model_dtype: str = "float32"
    device: str = "auto"
    max_length: int = 512
    batch_size: int = 32
    max_batch_tokens: int = 4096
    token_fraction: float = 1.0
    seed: int = 0
    compression: str | None = None
    splits: Sequence[str] = field(default_factory=lambda: ("train", "heldout"))

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"extraction.dtype {self.dtype!r}: use one of {', '.join(STORE_DTYPES)}")
        if not 0.0 < self.token_fraction <= 1.0:
            raise ConfigError(f"extraction.token_fraction must be in (0, 1], got {self.token_fraction}")
        if self.max_batch_tokens < self.max_length:
            raise ConfigError(
                f"extraction.max_batch_tokens ({self.max_batch_tokens}) must be >= extraction.max_length "
                f"({self.max_length}), or the longest document fits no batch"
            )

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "ExtractionSettings":
        """Build settings from the config's ``extraction`` section, ignoring keys it does not use."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in section.items() if k in known}
        if "splits" in values:
            values["splits"] = tuple(values["splits"])
        return cls(**values)

    @classmethod
    def for_model(cls, section: Mapping[str, Any], model: Mapping[str, Any]) -> "ExtractionSettings":
        """Settings for one model: the ``extraction`` section, with the model entry's ``store_dtype`` if it sets one."""
        store_dtype = model.get("store_dtype")
        return cls.from_config({**section, **({"dtype": store_dtype} if store_dtype else {})})


@dataclass(frozen=True)
class ExtractionPlan:
    """Tokenised documents in processing order, their batches and the rows they occupy in the store.

    Attributes:
        doc_index: corpus row of each document, in processing (store) order: longest first.
        token_ids: token ids of each document, in processing order.
        keep: sorted kept positions of each document (all of them unless ``token_fraction`` < 1).
        batches: lists of indices into the processing order.
        row_start: first store row of each document.
    """

    doc_index: list[int]
    token_ids: list[list[int]]
    keep: list[np.ndarray]
    batches: list[list[int]]
    row_start: np.ndarray

    @property
    def n_rows(self) -> int:
        """Total stored token rows N."""
        return int(sum(len(k) for k in self.keep))


def tokenize_documents(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Tokenise texts with the tokenizer's own special-token convention, truncated to ``max_length``."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def pack_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Pack items, given in descending length order, into consecutive batches.

    Each batch holds at most ``batch_size`` items and its padded size (items x longest) stays within
    ``max_batch_tokens``; a single item longer than the budget gets a batch of its own.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index, length in enumerate(lengths):
        longest = lengths[current[0]] if current else length
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def select_positions(length: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Return the sorted positions kept from a document of ``length`` tokens (at least one)."""
    if fraction >= 1.0:
        return np.arange(length)
    count = max(1, round(fraction * length))
    return np.sort(rng.choice(length, size=count, replace=False))


def plan_extraction(tokenizer: Any, texts: Sequence[str], settings: ExtractionSettings) -> ExtractionPlan:
    """Tokenise, sort by length (longest first, ties in corpus order) and batch the documents."""
    token_ids = tokenize_documents(tokenizer, texts, settings.max_length)
    order = sorted(range(len(texts)), key=lambda i: (-len(token_ids[i]), i))
    ordered = [token_ids[i] for i in order]
    empty = [i for i in order if not token_ids[i]]
    if empty:
        raise ConfigError(f"{len(empty)} documents tokenise to nothing (corpus rows {empty[:5]}); remove them")
    rng = np.random.default_rng(settings.seed)
    keep = [select_positions(len(ids), settings.token_fraction, rng) for ids in ordered]
    counts = np.array([len(k) for k in keep], dtype=np.int64)
    row_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    batches = pack_batches([len(ids) for ids in ordered], settings.batch_size, settings.max_batch_tokens)
    return ExtractionPlan(order, ordered, keep, batches, row_start)


def _pad_batch(
    token_ids: Sequence[Sequence[int]], keep: Sequence[np.ndarray], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch; return input ids, attention mask and the mask of rows to store."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(token_ids), width), dtype=torch.long)
    stored = torch.zeros((len(token_ids), width), dtype=torch.bool)
    for row, (ids, kept) in enumerate(zip(token_ids, keep, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        stored[row, torch.from_numpy(kept)] = True
    return input_ids.to(device), attention.to(device), stored.to(device)


def extract_activations(
    loaded: LoadedModel,
    corpus: pl.DataFrame,
    out_path: str | Path,
    settings: ExtractionSettings,
    attrs: Mapping[str, Any],
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Run the model over a corpus and write the activation store.

    Args:
        loaded: the model, tokenizer and manifest (from :func:`latent_atlas.models.load_model`).
        corpus: the documents table (``doc_id``, ``text``, ``label``, ``split``).
        out_path: the store to write (written under a temporary name, renamed on success).
        settings: layers, dtypes, batching and token selection.
        attrs: provenance to store (``model``, ``corpus``, ``corpus_sha256``, ``config_hash``).
        progress: show a progress bar on stderr.
        on_batch: called with the batch number after each batch is written (for monitoring).

    Returns:
        The path of the complete store.
    """
    corpus = selected_documents(corpus, settings)
    plan = plan_extraction(loaded.tokenizer, corpus["text"].to_list(), settings)
    store_attrs = store_attributes(loaded, settings, attrs)
    return write_store(loaded, plan, plan_documents(corpus, plan), out_path, settings, store_attrs, progress, on_batch)


def selected_documents(corpus: pl.DataFrame, settings: ExtractionSettings) -> pl.DataFrame:
    """The documents of the extracted splits, failing clearly when there are none."""
    corpus = corpus.filter(pl.col("split").is_in(list(settings.splits)))
    if corpus.height == 0:
        raise ConfigError(f"no documents in splits {list(settings.splits)}; check extraction.splits")
    return corpus


def plan_documents(corpus: pl.DataFrame, plan: ExtractionPlan) -> pl.DataFrame:
    """The store's documents table, in the plan's order, with each document's first row and row count."""
    rows = corpus[plan.doc_index] if plan.doc_index else corpus.clear()
    return rows.select("doc_id", "label", "split").with_columns(
        token_start=pl.Series(plan.row_start, dtype=pl.Int64),
        token_count=pl.Series([len(k) for k in plan.keep], dtype=pl.Int64),
    )


@dataclass(frozen=True)
class ExtractionJob:
    """What an extraction job (a whole store or one shard) starts from."""

    settings: ExtractionSettings
    loaded: LoadedModel
    corpus: pl.DataFrame
    attrs: dict[str, Any]


def start_extraction_job(
    section: Mapping[str, Any],
    model: Mapping[str, Any],
    model_dir: str | Path,
    corpus_path: str | Path,
    provenance: Mapping[str, Any],
) -> ExtractionJob:
    """Settings for this model, the model loaded as they say, the corpus, and the store's provenance attributes."""
    settings = ExtractionSettings.for_model(section, model)
    loaded = load_model(model_dir, settings.device, settings.model_dtype, "extraction.device", "extraction.model_dtype")
    corpus, corpus_meta = load_corpus_table(corpus_path)
    return ExtractionJob(settings, loaded, corpus, {**provenance, "corpus_sha256": corpus_meta["corpus_sha256"]})


def store_attributes(loaded: LoadedModel, settings: ExtractionSettings, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The store's attributes: the caller's provenance, the model's hash, the settings, when and where it ran."""
    return {
        **attrs,
        "model_sha256": loaded.manifest["weights_sha256"],
        "n_layers": loaded.n_layers,
        "code_version": code_version(),
        "created": utc_now(),
        **execution_context(),
        "model_dtype": loaded.dtype,  # what the forward passes ran in (extraction.model_dtype `auto` resolved)
        "device": str(loaded.device),
        "extraction": {**asdict(settings), "splits": list(settings.splits)},
    }


def write_store(
    loaded: LoadedModel,
    plan: ExtractionPlan,
    docs: pl.DataFrame,
    out_path: str | Path,
    settings: ExtractionSettings,
    store_attrs: Mapping[str, Any],
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    desc: str = "extract",
) -> Path:
    """Run the plan's batches through the model and write every stored row of every layer (atomically)."""
    layers = select_layers(settings.layers, loaded.n_layers)
    store_dtype = torch.float16 if settings.dtype == "float16" else torch.float32
    pad_id = _pad_id(loaded.tokenizer)
    with StoreWriter(
        out_path, plan.n_rows, loaded.d_model, layers, settings.dtype, dict(store_attrs), settings.compression
    ) as writer:
        _write_token_table(writer, plan)
        writer.write_docs(docs)
        bar = tqdm(total=plan.n_rows, unit="tok", disable=not progress, file=sys.stderr, desc=desc)
        batch_rows: dict[str, Any] = {}  # where the batch in flight goes: first store row, mask of stored positions

        def write(address: str, states: torch.Tensor) -> None:
            rows = states[batch_rows["stored"]]
            check_storable(address, rows, store_dtype)
            writer.write_states(address, batch_rows["start"], rows.to(store_dtype).cpu().numpy())

        with torch.inference_mode(), capture_residuals(loaded.parts, layers, write):
            for number, batch in enumerate(plan.batches):
                ids, attention, stored = _pad_batch(
                    [plan.token_ids[i] for i in batch], [plan.keep[i] for i in batch], pad_id, loaded.device
                )
                batch_rows.update(start=int(plan.row_start[batch[0]]), stored=stored)
                loaded.parts.body(input_ids=ids, attention_mask=attention, use_cache=False)
                bar.update(int(stored.sum()))
                if on_batch is not None:
                    on_batch(number)
        bar.close()
    return Path(out_path)


def check_storable(address: str, states: torch.Tensor, store_dtype: torch.dtype) -> None:
    """Refuse states that are non-finite or that the store's dtype cannot hold (float16 overflows to inf).

    Gemma's residual stream, for one, reaches ~10^5 in some dimensions: float16 would silently store inf.
    """
    if not bool(torch.isfinite(states).all()):
        raise StoreError(f"the model produced non-finite states at {address}; check the model dtype (model_dtype)")
    if store_dtype == torch.float16:
        largest = float(states.abs().max()) if states.numel() else 0.0
        if largest > torch.finfo(torch.float16).max:
            raise StoreError(
                f"{address} holds values up to {largest:.4g}, beyond float16's range (±65504): set "
                "`store_dtype: float32` in this model's entry under `models` (or `extraction.dtype: float32`)"
            )


def _write_token_table(writer: StoreWriter, plan: ExtractionPlan) -> None:
    """Write token ids, document numbers and positions of every stored row (a shard's plan may be empty)."""
    ids = [np.asarray(t, dtype=np.int64)[k] for t, k in zip(plan.token_ids, plan.keep, strict=True)]
    doc = [np.full(len(k), i) for i, k in enumerate(plan.keep)]
    empty = [np.zeros(0, dtype=np.int64)]
    writer.write_tokens(np.concatenate(ids or empty), np.concatenate(doc or empty), np.concatenate(plan.keep or empty))


def _pad_id(tokenizer: Any) -> int:
    """Return a pad id (the tokenizer's, else EOS, else 0): padded positions are masked and never stored."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
