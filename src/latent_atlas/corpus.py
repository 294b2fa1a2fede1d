"""Corpora: read jsonl / txt / parquet / HF datasets into one documents table.

The table (``results/corpora/{corpus}.parquet``) has the columns ``doc_id``, ``text``, ``label``,
``split`` (``train`` | ``heldout``) and ``source``, in a deterministic order; the sha256 of its content
is stored in the parquet metadata with the rest of its provenance.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from latent_atlas.errors import CorpusError
from latent_atlas.provenance import canonical_json, provenance_record, write_parquet_with_provenance

COLUMNS = ("doc_id", "text", "label", "split", "source")
SPLITS = ("train", "heldout")
FORMATS = ("jsonl", "txt", "parquet", "hf")
METADATA_KEY = "latent_atlas"
_SPLIT_ALIASES = {
    "train": "train",
    "heldout": "heldout",
    "held_out": "heldout",
    "test": "heldout",
    "validation": "heldout",
    "valid": "heldout",
    "dev": "heldout",
}


def read_corpus(name: str, spec: Mapping[str, Any]) -> pl.DataFrame:
    """Read the corpus described by a config entry into the documents table.

    Args:
        name: the corpus name in config; default document ids are ``{name}-{index:05d}``.
        spec: the config entry (``format``, ``path`` or ``dataset``, field names, ``heldout_fraction``,
            ``max_docs_per_label``).

    Raises:
        CorpusError: naming the file, field or value that is wrong and the config key to fix.
    """
    fmt = spec.get("format", "jsonl")
    readers = {"jsonl": _read_jsonl, "txt": _read_txt, "parquet": _read_parquet, "hf": _read_hf}
    if fmt not in readers:
        raise CorpusError(f"corpora.{name}.format is {fmt!r}; use one of {', '.join(FORMATS)}")
    raw, source = readers[fmt](name, spec)
    table = _normalise(name, spec, raw, source)
    table = _limit_per_label(table, spec.get("max_docs_per_label"))
    if table.height == 0:
        raise CorpusError(f"corpus '{name}' has no documents after reading {source}")
    return table


def _require_path(name: str, spec: Mapping[str, Any]) -> Path:
    """Return the corpus path from config, failing if it is missing or absent on disk."""
    if "path" not in spec:
        raise CorpusError(f"corpora.{name} needs a 'path'")
    path = Path(spec["path"])
    if not path.exists():
        raise CorpusError(f"corpora.{name}.path: {path} does not exist (paths are relative to the working directory)")
    return path


def _read_jsonl(name: str, spec: Mapping[str, Any]) -> tuple[pl.DataFrame, str]:
    """Read a JSON-lines file, one document per line."""
    path = _require_path(name, spec)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise CorpusError(f"{path}:{number} is not valid JSON: {error.msg}") from error
    return pl.DataFrame(rows, infer_schema_length=None), str(path)


def _read_txt(name: str, spec: Mapping[str, Any]) -> tuple[pl.DataFrame, str]:
    """Read plain text: a file (documents separated by blank lines) or a directory (one file per document).

    In a directory, a file's label is the name of its parent folder when files sit in sub-folders.
    """
    path = _require_path(name, spec)
    if path.is_file():
        blocks = [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n")]
        return pl.DataFrame({"text": [b for b in blocks if b]}), str(path)
    files = sorted(path.rglob("*.txt"))
    labels = [file.parent.name if file.parent != path else None for file in files]
    texts = [file.read_text(encoding="utf-8").strip() for file in files]
    ids = [str(file.relative_to(path).with_suffix("")) for file in files]
    return pl.DataFrame({"doc_id": ids, "text": texts, "label": labels}), str(path)


def _read_parquet(name: str, spec: Mapping[str, Any]) -> tuple[pl.DataFrame, str]:
    """Read a parquet file."""
    path = _require_path(name, spec)
    try:
        return pl.read_parquet(path), str(path)
    except Exception as error:  # polars raises several kinds for a bad file
        raise CorpusError(f"corpora.{name}.path: {path} is not a readable parquet file ({error})") from error


def _read_hf(name: str, spec: Mapping[str, Any]) -> tuple[pl.DataFrame, str]:
    """Read a Hugging Face dataset split with ``datasets.load_dataset`` (needs internet or a cache)."""
    try:
        import datasets
    except ImportError as error:
        raise CorpusError(
            f"corpora.{name} has format 'hf', which needs the 'datasets' package: pip install 'latent-atlas[hf]'"
        ) from error
    dataset = spec.get("dataset")
    if not dataset:
        raise CorpusError(f"corpora.{name} has format 'hf' but no 'dataset' (e.g. 'wikitext')")
    loaded = datasets.load_dataset(
        dataset, spec.get("config"), split=spec.get("hf_split", "train"), revision=spec.get("revision")
    )
    return pl.from_arrow(loaded.data.table), f"hf:{dataset}/{spec.get('config') or ''}:{spec.get('hf_split', 'train')}"


def _normalise(name: str, spec: Mapping[str, Any], raw: pl.DataFrame, source: str) -> pl.DataFrame:
    """Map the configured fields onto the standard columns and assign splits."""
    text_field = spec.get("text_field", "text")
    if text_field not in raw.columns:
        raise CorpusError(
            f"corpus '{name}' ({source}) has no field '{text_field}' (fields: {', '.join(raw.columns)}); "
            f"set corpora.{name}.text_field"
        )
    n = raw.height
    ids = _column(raw, spec.get("id_field", "doc_id"), [f"{name}-{i:05d}" for i in range(n)]).cast(pl.String)
    labels = _column(raw, spec.get("label_field", "label"), [None] * n).cast(pl.String)
    table = pl.DataFrame(
        {
            "doc_id": ids,
            "text": raw[text_field].cast(pl.String),
            "label": labels,
            "source": [source] * n,
        }
    )
    if table["doc_id"].is_duplicated().any():
        dupes = table.filter(pl.col("doc_id").is_duplicated())["doc_id"].unique().head(5).to_list()
        raise CorpusError(f"corpus '{name}' has duplicate document ids, e.g. {dupes}")
    if table["text"].is_null().any():
        raise CorpusError(f"corpus '{name}' has documents with no text in field '{text_field}'")
    splits = _splits(name, spec, raw, table["doc_id"].to_list())
    return table.with_columns(pl.Series("split", splits)).select(COLUMNS)


def _column(raw: pl.DataFrame, field: str, fallback: list[Any]) -> pl.Series:
    """Return ``raw[field]`` if present, else a series of ``fallback`` values."""
    return raw[field] if field in raw.columns else pl.Series(fallback, dtype=pl.String)


def _splits(name: str, spec: Mapping[str, Any], raw: pl.DataFrame, doc_ids: list[str]) -> list[str]:
    """Return each document's split: from the split field if present, else by a stable hash of its id."""
    field = spec.get("split_field", "split")
    if field in raw.columns:
        values = raw[field].cast(pl.String).to_list()
        unknown = sorted({v for v in values if v not in _SPLIT_ALIASES}, key=str)
        if unknown:
            raise CorpusError(
                f"corpus '{name}' field '{field}' has split values {unknown}; use train or heldout "
                "(test/validation/dev also mean heldout)"
            )
        return [_SPLIT_ALIASES[v] for v in values]
    fraction = float(spec.get("heldout_fraction", 0.2))
    return ["heldout" if _unit_hash(doc_id) < fraction else "train" for doc_id in doc_ids]


def _unit_hash(text: str) -> float:
    """Map a string to [0, 1) deterministically (sha256-based, unlike Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _limit_per_label(table: pl.DataFrame, limit: int | None) -> pl.DataFrame:
    """Keep at most ``limit`` documents per (label, split), the first ones in corpus order."""
    if not limit:
        return table
    keep = pl.int_range(pl.len()).over(["label", "split"]) < limit
    return table.filter(keep)


def corpus_sha256(table: pl.DataFrame) -> str:
    """Return the sha256 of a documents table's content (ids, texts, labels, splits, in order)."""
    digest = hashlib.sha256()
    for row in table.select(["doc_id", "text", "label", "split"]).iter_rows():
        digest.update(canonical_json(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_corpus(table: pl.DataFrame, path: str | os.PathLike[str], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write the documents table to parquet atomically, with its sha256 and provenance as metadata."""
    meta = provenance_record(dict(spec), corpus_sha256=corpus_sha256(table), n_docs=table.height)
    write_parquet_with_provenance(table, path, meta)
    return meta


def load_corpus_table(path: str | os.PathLike[str]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Read a documents table and its metadata, checking its columns."""
    try:
        table = pl.read_parquet(path)
        metadata = pl.read_parquet_metadata(path)
    except FileNotFoundError as error:
        raise CorpusError(f"corpus table {path} does not exist; run `snakemake {path}`") from error
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing or METADATA_KEY not in metadata:
        raise CorpusError(
            f"{path} is not a latent-atlas corpus table (missing {missing or 'metadata'}); "
            f"delete it and run `snakemake {path}`"
        )
    return table, json.loads(metadata[METADATA_KEY])
