"""The HDF5 activation store: one file per (model, corpus).

Layout (``N`` stored tokens, ``d`` residual width)::

    /tokens/ids  int32[N]   /tokens/doc int32[N]   /tokens/pos int32[N]
    /resid/00 … /resid/LL   float16|float32|bfloat16-as-float32 [N, d]
    /ln_final               same dtype [N, d]: the post-final-norm state the unembedding reads
    /docs/doc_id /docs/label /docs/split (utf-8)   /docs/token_start int64   /docs/token_count int32
    attrs: format, format_version, model, model_sha256, corpus, corpus_sha256, config_hash,
           code_version, dtype, convention, layers, n_layers, d_model, created, complete

``tokens/doc`` indexes the rows of ``/docs``; a document's tokens are the contiguous rows
``token_start : token_start + token_count`` (documents are stored in extraction order, longest first).
Datasets are chunked along N, so one layer for any slice of tokens is one contiguous read. The writer
writes under a temporary name and renames on success; the reader validates schema and attrs and fails
with a :class:`StoreError` that says what is wrong and how to rebuild.
"""

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import polars as pl

from latent_atlas.addresses import LN_FINAL, parse_resid_address, resid_address, store_dataset
from latent_atlas.errors import StoreError, rebuild_advice
from latent_atlas.provenance import remove_stale_temporaries, require_free_space, temporary_sibling

FORMAT = "latent-atlas-activations"
FORMAT_VERSION = 1
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
CONVENTION = (
    "resid/00 = embedding output (input of block 1); resid/LL = raw output of block LL, before the final "
    "norm (taken by hooks, so resid/{L} is NOT HF hidden_states[L], which is post-norm); ln_final = "
    "final_norm(resid/{L}) = HF hidden_states[L] = what lm_head reads. Rows are (doc, position) pairs with "
    "right padding removed; pos is the token's position in its document (0 = first token)."
)
REQUIRED_ATTRS = (
    "format",
    "format_version",
    "model",
    "model_sha256",
    "corpus",
    "corpus_sha256",
    "config_hash",
    "code_version",
    "dtype",
    "convention",
    "layers",
    "n_layers",
    "d_model",
    "created",
    "complete",
)
_TARGET_CHUNK_BYTES = 1 << 20
_STORE_PATTERN = "results/activations/{model}/{corpus}.h5"


def chunk_rows(d_model: int, itemsize: int, n_tokens: int) -> int:
    """Return rows per HDF5 chunk: about 1 MiB per chunk, never more than the dataset."""
    return max(1, min(n_tokens, _TARGET_CHUNK_BYTES // (d_model * itemsize)))


class StoreWriter:
    """Write a store with preallocated datasets, under a temporary name, renamed only on success.

    Use as a context manager: leaving the block normally marks the file complete and renames it to
    ``path``; an exception (or a killed process) leaves no file at ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_tokens: int,
        d_model: int,
        layers: Sequence[int],
        dtype: str,
        attrs: Mapping[str, Any],
        compression: str | None = None,
    ) -> None:
        if dtype not in STORE_DTYPES:
            raise StoreError(f"store dtype {dtype!r} is not supported; use one of {', '.join(STORE_DTYPES)}")
        self.path = Path(path)
        self.tmp = temporary_sibling(self.path)
        self.n_tokens, self.d_model, self.layers = n_tokens, d_model, list(layers)
        self.dtype = STORE_DTYPES[dtype]
        self._attrs = {**attrs, "dtype": dtype, "layers": self.layers, "d_model": d_model}
        self._compression = None if compression in (None, "none") else compression
        self._file: h5py.File | None = None

    def __enter__(self) -> "StoreWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self.tmp.unlink(missing_ok=True)
        if self._compression is None:
            require_free_space(
                self.path.parent,
                self.states_nbytes,
                f"an activation store of {self.n_tokens} tokens x {len(self.layers) + 1} addresses",
                "store fewer layers (`extraction.layers`) or tokens (`extraction.token_fraction`), "
                "float16 (`extraction.dtype`) or compressed states (`extraction.compression: lzf`)",
            )
        self._file = h5py.File(self.tmp, "w", libver="latest")
        self._create_datasets()
        return self

    @property
    def states_nbytes(self) -> int:
        """Bytes of the stored states: every layer's residual and ``ln_final``, uncompressed."""
        return self.n_tokens * self.d_model * (len(self.layers) + 1) * np.dtype(self.dtype).itemsize

    def _create_datasets(self) -> None:
        """Preallocate every dataset (N is known before extraction starts)."""
        file = self._require_open()
        rows = chunk_rows(self.d_model, np.dtype(self.dtype).itemsize, max(self.n_tokens, 1))
        shape = (self.n_tokens, self.d_model)
        for address in [*map(resid_address, self.layers), LN_FINAL]:
            file.create_dataset(
                store_dataset(address),
                shape=shape,
                dtype=self.dtype,
                chunks=(rows, self.d_model) if self.n_tokens else None,
                compression=self._compression,
            )
        for name in ("ids", "doc", "pos"):
            file.create_dataset(f"tokens/{name}", shape=(self.n_tokens,), dtype=np.int32)
        for key, value in self._attrs.items():
            file.attrs[key] = _attr_value(value)
        file.attrs["format"] = FORMAT
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["convention"] = CONVENTION
        file.attrs["complete"] = False

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError("StoreWriter is used outside its `with` block")
        return self._file

    def dataset(self, name: str) -> h5py.Dataset:
        """The open dataset ``name`` (``tokens/ids``, ``resid/05``, ...), for writers that copy in blocks."""
        return self._require_open()[name]

    def write_tokens(self, ids: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> None:
        """Write the whole token table (length N, in store row order)."""
        file = self._require_open()
        for name, values in (("ids", ids), ("doc", doc), ("pos", pos)):
            if len(values) != self.n_tokens:
                raise StoreError(f"tokens/{name} has {len(values)} rows, the store {self.n_tokens}")
            file[f"tokens/{name}"][...] = np.asarray(values, dtype=np.int32)

    def write_docs(self, docs: pl.DataFrame) -> None:
        """Write the documents table: doc_id, label, split, token_start, token_count."""
        file = self._require_open()
        text = h5py.string_dtype("utf-8")
        for column in ("doc_id", "label", "split"):
            values = [v if v is not None else "" for v in docs[column].to_list()]
            file.create_dataset(f"docs/{column}", data=np.array(values, dtype=object), dtype=text)
        file.create_dataset("docs/token_start", data=docs["token_start"].to_numpy().astype(np.int64))
        file.create_dataset("docs/token_count", data=docs["token_count"].to_numpy().astype(np.int32))

    def write_states(self, address: str, start: int, states: np.ndarray) -> None:
        """Write rows ``start : start + len(states)`` of one address (``resid.LL`` or ``ln_final``)."""
        file = self._require_open()
        file[store_dataset(address)][start : start + len(states)] = states

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        file = self._require_open()
        if exc_type is None:
            file.attrs["complete"] = True
        file.close()
        self._file = None
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _attr_value(value: Any) -> Any:
    """Convert a Python value to something HDF5 attributes hold (dicts become JSON text)."""
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return "" if value is None else value


class ActivationStore:
    """Read a store: validates on open; reads any address for any slice or set of token rows.

    Example:
        >>> with ActivationStore("results/activations/smollm2-135m/registers.h5") as store:
        ...     x = store.read("resid.12", slice(0, 1024))   # float32 (1024, 576)
    """

    def __init__(self, path: str | os.PathLike[str], expect: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self._file = _open_hdf5(self.path)
        try:
            self._validate()
            if expect:
                self.check(expect)
        except StoreError:
            self._file.close()
            raise

    # ---- validation -------------------------------------------------------------------------------

    def _fail(self, problem: str) -> StoreError:
        """A broken store: the problem, and how to rebuild it when the workflow makes it."""
        return StoreError(f"{self.path}: {problem}.{rebuild_advice(self.path)}")

    def _validate(self) -> None:
        attrs = self._file.attrs
        if attrs.get("format") != FORMAT:
            advice = rebuild_advice(self.path, "If it should be one, delete it and rebuild it")
            raise StoreError(
                f"{self.path} is an HDF5 file but not a latent-atlas activation store (its format attribute is "
                f"{attrs.get('format')!r}, a store's is {FORMAT!r}): give a store, {_STORE_PATTERN}.{advice}"
            )
        version = int(attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path} has store format {version}, newer than this latent-atlas reads "
                f"({FORMAT_VERSION}); upgrade latent-atlas"
            )
        missing = [key for key in REQUIRED_ATTRS if key not in attrs]
        if missing:
            raise self._fail(f"missing attributes {missing}")
        if not bool(attrs["complete"]):
            raise self._fail("the file is incomplete (its writer did not finish)")
        self._check_datasets()

    def _check_datasets(self) -> None:
        n, d = self.n_tokens, self.d_model
        for address in [*self.addresses]:
            name = store_dataset(address)
            if name not in self._file:
                raise self._fail(f"dataset {name} listed in attrs is missing")
            if self._file[name].shape != (n, d):
                raise self._fail(f"dataset {name} has shape {self._file[name].shape}, expected {(n, d)}")
        for name in ("docs/doc_id", "docs/token_start", "docs/token_count"):
            if name not in self._file:
                raise self._fail(f"dataset /{name} is missing")
        if int(self._file["docs/token_count"][...].sum()) != n:
            raise self._fail("documents' token counts do not add up to the number of stored tokens")

    def check(self, expect: Mapping[str, Any]) -> None:
        """Raise :class:`StoreError` if any attribute differs from ``expect`` (e.g. a model's sha256)."""
        attrs = self.attrs
        wrong = {k: (attrs.get(k), v) for k, v in expect.items() if attrs.get(k) != v}
        if "model_sha256" in wrong:
            have, want = wrong["model_sha256"]
            advice = rebuild_advice(self.path, "If that model has changed since, rebuild the store")
            raise StoreError(
                f"{self.path} was made from another model than the one given (the store's: {attrs.get('model')}, "
                f"weights sha256 {str(have)[:12]}…; the one given: {str(want)[:12]}…). Read it with the model it was "
                f"made from (results/models/{attrs.get('model')}).{advice}"
            )
        if wrong:
            details = "; ".join(f"{k}: store has {have!r}, expected {want!r}" for k, (have, want) in wrong.items())
            raise self._fail(f"does not match its inputs ({details})")

    # ---- metadata ---------------------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's provenance attributes as plain Python values."""
        return {key: _python_value(value) for key, value in self._file.attrs.items()}

    @property
    def n_tokens(self) -> int:
        """Number of stored token rows N."""
        return int(self._file["tokens/ids"].shape[0])

    @property
    def d_model(self) -> int:
        """Residual width d."""
        return int(self._file.attrs["d_model"])

    @property
    def layers(self) -> list[int]:
        """Stored residual layers (0 = embedding output)."""
        return [int(layer) for layer in np.atleast_1d(self._file.attrs["layers"])]

    @property
    def addresses(self) -> list[str]:
        """Stored addresses: ``resid.LL`` for each stored layer, then ``ln_final``."""
        return [*map(resid_address, self.layers), LN_FINAL]

    # ---- data -------------------------------------------------------------------------------------

    def read(
        self,
        address: str | int,
        rows: slice | Sequence[int] | np.ndarray | None = None,
        dtype: type[np.floating] = np.float32,
    ) -> np.ndarray:
        """Read states of one address for some token rows.

        Args:
            address: ``resid.LL``, ``ln_final``, or a layer number.
            rows: a slice (one contiguous read), an index array (any order, repeats allowed) or None (all).
            dtype: returned dtype (analyses run in float32 by default).

        Returns:
            Array of shape ``(n_rows, d)``.
        """
        name = self._dataset_name(address)
        dataset = self._file[name]
        if rows is None or isinstance(rows, slice):
            return np.asarray(dataset[rows if rows is not None else slice(None)], dtype=dtype)
        index = np.asarray(rows, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n_tokens):
            raise IndexError(f"row indices must lie in 0..{self.n_tokens - 1}")
        unique, inverse = np.unique(index, return_inverse=True)
        return np.asarray(dataset[unique], dtype=dtype)[inverse]

    def read_into(self, address: str | int, start: int, out: np.ndarray) -> np.ndarray:
        """Read rows ``start : start + len(out)`` into a buffer of the stored dtype, with no conversion.

        For loops over blocks: one buffer serves every block (the last one may be shorter: pass a slice).
        """
        dataset = self._file[self._dataset_name(address)]
        if out.dtype != dataset.dtype or out.ndim != 2 or out.shape[1] != self.d_model:
            raise ValueError(f"buffer must be (n, {self.d_model}) {dataset.dtype}, got {out.shape} {out.dtype}")
        dataset.read_direct(out, np.s_[start : start + len(out)], np.s_[0 : len(out)])
        return out

    def stored_dtype(self, address: str | int) -> np.dtype:
        """The dtype an address is stored in (float16 or float32)."""
        return self._file[self._dataset_name(address)].dtype

    def _dataset_name(self, address: str | int) -> str:
        if isinstance(address, int):
            address = resid_address(address)
        if address != LN_FINAL:
            layer = parse_resid_address(address)
            if layer not in self.layers:
                raise KeyError(f"{address} is not stored in {self.path} (stored layers: {self.layers})")
        return store_dataset(address)

    def tokens(self) -> pl.DataFrame:
        """The token table: ``row``, ``token_id``, ``doc`` (row of docs), ``pos``."""
        return pl.DataFrame(
            {
                "row": np.arange(self.n_tokens, dtype=np.int64),
                "token_id": self._file["tokens/ids"][...],
                "doc": self._file["tokens/doc"][...],
                "pos": self._file["tokens/pos"][...],
            }
        )

    def docs(self) -> pl.DataFrame:
        """The documents table: ``doc_id``, ``label``, ``split``, ``token_start``, ``token_count``."""
        group = self._file["docs"]
        columns: dict[str, Any] = {c: group[c].asstr()[...] for c in ("doc_id", "label", "split") if c in group}
        columns["token_start"] = group["token_start"][...]
        columns["token_count"] = group["token_count"][...]
        return pl.DataFrame(columns)

    def doc_rows(self, doc_id: str) -> slice:
        """Return the contiguous rows of one document."""
        docs = self.docs().filter(pl.col("doc_id") == doc_id)
        if docs.height != 1:
            raise KeyError(f"document {doc_id!r} is not in {self.path}")
        start, count = int(docs["token_start"][0]), int(docs["token_count"][0])
        return slice(start, start + count)

    # ---- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_hdf5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into a :class:`StoreError` with the fix."""
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not an activation store: give a store file, {_STORE_PATTERN}")
    if not path.exists():
        advice = rebuild_advice(path, "Build it") or f" Check the path: stores are {_STORE_PATTERN}."
        raise StoreError(f"activation store {path} does not exist.{advice}")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise StoreError(
            f"{path} cannot be opened as HDF5 ({error}): it is truncated or not an HDF5 file.{rebuild_advice(path)}"
        ) from error


def _python_value(value: Any) -> Any:
    """Convert an HDF5 attribute to a plain Python value."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


__all__ = ["FORMAT", "ActivationStore", "StoreWriter", "chunk_rows"]
