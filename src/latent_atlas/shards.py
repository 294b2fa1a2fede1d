"""Sharded extraction: one store's forward passes split over several jobs, gathered into the same store.

The split is a split of the *extraction plan*, not of the corpus. Every shard job computes the global plan
(tokenisation, length sort, token sampling and batching: cheap and deterministic) and runs a contiguous range
of its batches; since batches hold consecutive documents of the processing order, a shard holds a contiguous
range of documents and of store rows. Each batch is the very batch the unsharded job would run (same
documents, same padding), so its states are the same numbers; gathering the shards in order therefore
rebuilds the unsharded store row for row: the same token table, ``/docs`` offsets, states and attributes
(``created`` aside; the gathered store adds ``shards`` and ``shard_provenance``).

A shard file is itself a valid store (local rows and document numbers) whose attributes also say which part
of which plan it holds (``shard``, ``shards``, ``shard_batches``, ``shard_row_start``, ``shard_doc_start``,
``plan_rows``, ``plan_docs``, ``plan_batches``, ``plan_sha256``); the gather checks them all before it writes,
then copies one address at a time in blocks, so its memory is one block and the documents table.
"""

import bisect
import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import polars as pl

from latent_atlas.addresses import LN_FINAL, resid_address, store_dataset
from latent_atlas.errors import ConfigError, StoreError
from latent_atlas.extract import (  # the unsharded extraction's own steps: a shard must run exactly as it does
    ExtractionPlan,
    ExtractionSettings,
    plan_documents,
    plan_extraction,
    selected_documents,
    store_attributes,
    write_store,
)
from latent_atlas.models import LoadedModel
from latent_atlas.provenance import execution_context, utc_now
from latent_atlas.store import ActivationStore, StoreWriter

SCHEDULER_ATTRS = ("slurm_job_id", "slurm_node")  # where a job ran (latent_atlas.provenance.execution_context)
# Attributes only a shard file carries: where its part lies in the global plan.
SHARD_ATTRS = (
    "shard",
    "shards",
    "shard_batches",
    "shard_row_start",
    "shard_doc_start",
    "plan_rows",
    "plan_docs",
    "plan_batches",
    "plan_sha256",
)
# Attributes that may differ between the shards of one store (each job has its own clock, device, checkout).
PER_SHARD_ATTRS = (
    "created",
    "device",
    "code_version",
    "slurm_job_id",
    "slurm_node",
    "shard",
    "shard_batches",
    "shard_row_start",
    "shard_doc_start",
)
# Attributes the StoreWriter sets itself from its arguments.
_WRITER_ATTRS = ("format", "format_version", "convention", "complete", "dtype", "layers", "d_model")
DEFAULT_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class Shard:
    """One shard's part of the global plan: contiguous ranges of batches, documents and store rows."""

    index: int
    count: int
    batches: range
    docs: range
    rows: range


def batch_costs(plan: ExtractionPlan) -> list[int]:
    """Padded tokens of each batch (documents x longest document): what its forward pass costs."""
    return [len(batch) * max(len(plan.token_ids[i]) for i in batch) for batch in plan.batches]


def split_batches(costs: Sequence[int], n_shards: int) -> list[range]:
    """Split batches into ``n_shards`` contiguous ranges of about equal cost.

    Each boundary is the batch boundary nearest to its share of the total cost (exact integer arithmetic,
    ties to the earlier boundary), moved where needed so that every shard gets at least one batch. With more
    shards than batches, the first shards get one batch each and the rest none.
    """
    if n_shards < 1:
        raise ConfigError(f"extraction.shards must be at least 1, got {n_shards}")
    n_batches = len(costs)
    if n_shards >= n_batches:
        return [range(min(k, n_batches), min(k + 1, n_batches)) for k in range(n_shards)]
    before = [0]
    for cost in costs:
        before.append(before[-1] + int(cost))
    total = before[-1]
    bounds = [0]
    for k in range(1, n_shards):
        target = total * k  # compare before[i] * n_shards with total * k: no floating point
        i = bisect.bisect_left(before, -(-target // n_shards))  # the first boundary at or past the target
        if i > 0 and target - before[i - 1] * n_shards <= before[i] * n_shards - target:
            i -= 1
        bounds.append(min(max(i, bounds[-1] + 1), n_batches - (n_shards - k)))
    bounds.append(n_batches)
    return [range(start, stop) for start, stop in itertools.pairwise(bounds)]


def plan_shards(plan: ExtractionPlan, n_shards: int) -> list[Shard]:
    """Split a plan into ``n_shards`` shards, in store order (shard k's rows all precede shard k+1's)."""
    counts = [len(k) for k in plan.keep]
    shards = []
    doc, row = 0, 0
    for index, batches in enumerate(split_batches(batch_costs(plan), n_shards)):
        n_docs = sum(len(plan.batches[b]) for b in batches)
        if n_docs and plan.batches[batches.start][0] != doc:
            raise AssertionError("batches do not hold consecutive documents")  # pack_batches guarantees it
        n_rows = sum(counts[doc : doc + n_docs])
        shards.append(Shard(index, n_shards, batches, range(doc, doc + n_docs), range(row, row + n_rows)))
        doc, row = doc + n_docs, row + n_rows
    return shards


def shard_plan(plan: ExtractionPlan, shard: Shard) -> ExtractionPlan:
    """The part of a plan one shard runs, with batches and rows renumbered from 0 (a store of its own)."""
    first = shard.docs.start
    return ExtractionPlan(
        doc_index=plan.doc_index[shard.docs.start : shard.docs.stop],
        token_ids=plan.token_ids[shard.docs.start : shard.docs.stop],
        keep=plan.keep[shard.docs.start : shard.docs.stop],
        batches=[[i - first for i in plan.batches[b]] for b in shard.batches],
        row_start=plan.row_start[shard.docs.start : shard.docs.stop] - shard.rows.start,
    )


def plan_fingerprint(plan: ExtractionPlan) -> str:
    """sha256 of everything that fixes the store's rows: document order, token ids, kept positions, batches."""
    digest = hashlib.sha256()
    digest.update(np.asarray(plan.doc_index, dtype=np.int64).tobytes())
    for ids, kept in zip(plan.token_ids, plan.keep, strict=True):
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(np.int64(len(kept)).tobytes())
        digest.update(np.asarray(kept, dtype=np.int64).tobytes())
    digest.update(np.asarray([len(batch) for batch in plan.batches], dtype=np.int64).tobytes())
    return digest.hexdigest()


def extract_shard(
    loaded: LoadedModel,
    corpus: pl.DataFrame,
    out_path: str | Path,
    settings: ExtractionSettings,
    attrs: Mapping[str, Any],
    shard: int,
    n_shards: int,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Write shard ``shard`` of ``n_shards`` of the store :func:`~latent_atlas.extract.extract_activations` writes.

    Arguments are those of ``extract_activations`` plus the shard's number (from 0) and the number of shards.
    A shard with no batches (more shards than batches) is written too, as a store of 0 rows.

    Returns:
        The path of the complete shard.
    """
    if not 0 <= shard < n_shards:
        raise ConfigError(f"shard {shard} does not exist: extraction.shards is {n_shards} (shards 0..{n_shards - 1})")
    corpus = selected_documents(corpus, settings)
    plan = plan_extraction(loaded.tokenizer, corpus["text"].to_list(), settings)
    part = plan_shards(plan, n_shards)[shard]
    local = shard_plan(plan, part)
    store_attrs = store_attributes(loaded, settings, attrs) | {
        "shard": shard,
        "shards": n_shards,
        "shard_batches": [part.batches.start, part.batches.stop],
        "shard_row_start": part.rows.start,
        "shard_doc_start": part.docs.start,
        "plan_rows": plan.n_rows,
        "plan_docs": len(plan.doc_index),
        "plan_batches": len(plan.batches),
        "plan_sha256": plan_fingerprint(plan),
    }
    docs = plan_documents(corpus, local)
    return write_store(loaded, local, docs, out_path, settings, store_attrs, progress, on_batch, f"shard {shard}")


# ---- gather ---------------------------------------------------------------------------------------------


def gather_shards(
    shard_paths: Sequence[str | Path],
    out_path: str | Path,
    expect: Mapping[str, Any] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Path:
    """Concatenate the shards of one store, in order, into a single store at ``out_path``.

    Every shard is checked first (complete and readable, the right shard of the right number of shards, all
    of one plan, model, corpus and config, contiguous): nothing is written unless all pass. The store is
    written under a temporary name and renamed on success, like any store; it has the layout, chunking and
    compression the unsharded extraction gives it.

    Args:
        shard_paths: the shard files, shard 0 first.
        out_path: the store to write.
        expect: attributes every shard must have (the rule's ``model``, ``corpus``, ``config_hash``).
        block_bytes: rows are copied in blocks of about this many bytes (the gather's memory, besides the
            documents table).

    Returns:
        The path of the complete store.

    Raises:
        StoreError: naming the shard at fault and the fix.
    """
    paths = [Path(p) for p in shard_paths]
    out_path = Path(out_path)
    if not paths:
        raise ConfigError(f"no shards to gather into {out_path}")
    shard_attrs = [_check_shard(path, k, len(paths), out_path, expect) for k, path in enumerate(paths)]
    _check_same_plan(paths, shard_attrs, out_path)
    first = shard_attrs[0]
    layers = [int(layer) for layer in np.atleast_1d(first["layers"])]
    addresses = [*map(resid_address, layers), LN_FINAL]
    compression = json.loads(first["extraction"]).get("compression")
    docs: dict[str, list[Any]] = {column: [] for column in _DOC_COLUMNS}
    with StoreWriter(
        out_path,
        int(first["plan_rows"]),
        int(first["d_model"]),
        layers,
        str(first["dtype"]),
        _gathered_attrs(shard_attrs),
        compression,
    ) as writer:
        for path, attrs in zip(paths, shard_attrs, strict=True):
            row0, doc0 = int(attrs["shard_row_start"]), int(attrs["shard_doc_start"])
            with h5py.File(path, "r") as source:
                for column in _DOC_COLUMNS:
                    values = source[f"docs/{column}"]
                    docs[column].append(values.asstr()[...] if values.dtype.kind == "O" else values[...])
                docs["token_start"][-1] = docs["token_start"][-1] + row0
                for name, offset in (("ids", 0), ("doc", doc0), ("pos", 0)):
                    _copy_rows(source[f"tokens/{name}"], writer.dataset(f"tokens/{name}"), row0, block_bytes, offset)
                for address in addresses:
                    name = store_dataset(address)
                    _copy_rows(source[name], writer.dataset(name), row0, block_bytes)
        writer.write_docs(
            pl.DataFrame(
                {
                    column: np.concatenate(parts) if column.startswith("token_") else _strings(parts)
                    for column, parts in docs.items()
                }
            )
        )
    return out_path


_DOC_COLUMNS = ("doc_id", "label", "split", "token_start", "token_count")


def _strings(parts: list[np.ndarray]) -> pl.Series:
    """Concatenate the string columns of the shards' documents tables (some may be empty)."""
    return pl.Series([value for part in parts for value in part.tolist()], dtype=pl.String)


def _copy_rows(source: h5py.Dataset, target: h5py.Dataset, row0: int, block_bytes: int, offset: int = 0) -> None:
    """Copy every row of ``source`` to ``target[row0:]`` in blocks, adding ``offset`` (for document numbers)."""
    n_rows = source.shape[0]
    if n_rows == 0:
        return
    row_bytes = source.dtype.itemsize * int(np.prod(source.shape[1:], dtype=np.int64))
    step = max(1, block_bytes // row_bytes)
    buffer = np.empty((min(step, n_rows), *source.shape[1:]), dtype=source.dtype)
    for start in range(0, n_rows, step):
        block = buffer[: min(step, n_rows - start)]
        source.read_direct(block, np.s_[start : start + len(block)], np.s_[0 : len(block)])
        if offset:
            block += offset
        target[row0 + start : row0 + start + len(block)] = block


def _check_shard(
    path: Path, index: int, count: int, out_path: Path, expect: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Open and validate one shard; return its attributes. Raise a StoreError naming the shard and the fix."""
    name = f"shard {index} of {count} ({path})"
    rebuild = f"delete it and run `snakemake {out_path}` again (it re-extracts the missing shard)"
    if not path.exists():
        raise StoreError(f"{name} does not exist: run `snakemake {out_path}` to extract it")
    try:
        with ActivationStore(path, expect=expect) as store:
            attrs, n_rows = store.attrs, store.n_tokens
    except StoreError as error:
        raise StoreError(f"{name} cannot be gathered: {error} To fix it, {rebuild}.") from error
    with h5py.File(path, "r") as opened:
        n_docs = int(opened["docs/token_count"].shape[0])
    missing = [key for key in SHARD_ATTRS if key not in attrs]
    if missing:
        raise StoreError(f"{name} is not a shard (it lacks {missing}): {rebuild}")
    if (attrs["shard"], attrs["shards"]) != (index, count):
        raise StoreError(
            f"{name} holds shard {attrs['shard']} of {attrs['shards']}: it is stale (extraction.shards changed?) "
            f"or the shards are out of order; {rebuild}"
        )
    attrs["_rows"], attrs["_docs"] = n_rows, n_docs
    return attrs


def _check_same_plan(paths: Sequence[Path], shard_attrs: Sequence[dict[str, Any]], out_path: Path) -> None:
    """Check that the shards are parts of one plan (same model, corpus, config, rows) and tile it in order."""
    first = shard_attrs[0]
    row, doc, batch = 0, 0, 0
    fix = f"the shards come from different runs; delete {paths[0].parent} and run `snakemake {out_path}` again"
    for index, (path, attrs) in enumerate(zip(paths, shard_attrs, strict=True)):
        name = f"shard {index} of {len(paths)} ({path})"
        keys = {*first, *attrs} - set(PER_SHARD_ATTRS)
        differ = sorted(key for key in keys if not key.startswith("_") and attrs.get(key) != first.get(key))
        if differ:
            details = "; ".join(f"{key}: {attrs.get(key)!r} vs {first.get(key)!r}" for key in differ)
            raise StoreError(f"{name} differs from shard 0 ({paths[0]}) in {details}: {fix}")
        placed = (attrs["shard_row_start"], attrs["shard_doc_start"], attrs["shard_batches"][0])
        if placed != (row, doc, batch):
            raise StoreError(
                f"{name} starts at row {placed[0]}, document {placed[1]}, batch {placed[2]}, but the shards before "
                f"it end at row {row}, document {doc}, batch {batch}: {fix}"
            )
        row, doc, batch = row + attrs["_rows"], doc + attrs["_docs"], attrs["shard_batches"][1]
    if (row, doc, batch) != (first["plan_rows"], first["plan_docs"], first["plan_batches"]):
        raise StoreError(
            f"the shards hold {row} rows, {doc} documents and {batch} batches, their plan {first['plan_rows']}, "
            f"{first['plan_docs']} and {first['plan_batches']}: {fix}"
        )


def _gathered_attrs(shard_attrs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The gathered store's attributes: the unsharded store's, with ``shards`` and ``shard_provenance`` added.

    ``created`` (and the SLURM job, if any) is the gather's; ``device`` and ``code_version`` are the shards'
    (all of them, joined with "; ", in the rare case they differ); each shard's own are in ``shard_provenance``.
    """
    first = shard_attrs[0]
    attrs = {
        key: value
        for key, value in first.items()
        if key not in SHARD_ATTRS
        and key not in _WRITER_ATTRS
        and key not in SCHEDULER_ATTRS
        and not key.startswith("_")
    }
    for key in ("device", "code_version"):
        attrs[key] = "; ".join(dict.fromkeys(str(a[key]) for a in shard_attrs))
    provenance = [
        {key: a[key] for key in ("shard", "created", "device", "code_version", *SCHEDULER_ATTRS) if key in a}
        | {"rows": a["_rows"]}
        for a in shard_attrs
    ]
    gathered = {"created": utc_now(), **execution_context()}
    return attrs | gathered | {"shards": len(shard_attrs), "shard_provenance": json.dumps(provenance)}
