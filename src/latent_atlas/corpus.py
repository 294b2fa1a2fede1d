"""Corpora: read jsonl / txt / parquet / HF datasets / the training family's corpus into one documents table.

The table (``results/corpora/{corpus}.parquet``) has the columns ``doc_id``, ``text``, ``label``,
``split`` (``train`` | ``heldout``) and ``source``, in a deterministic order; the sha256 of its content
is stored in the parquet metadata with the rest of its provenance.

Format ``training`` reads the documents the training family assembled (``results/training/{family}/
corpus.parquet``): the splits the family never trains on (``test``, ``validation``), mapped onto ``heldout`` /
``train`` by the entry's ``splits``, with their registers as labels; a text of the family's train split is never
kept, so the family's claims and the analyses on this corpus stay apart.
"""

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from latent_atlas.errors import CorpusError
from latent_atlas.provenance import canonical_json, provenance_record, write_parquet_with_provenance

COLUMNS = ("doc_id", "text", "label", "split", "source")
SPLITS = ("train", "heldout")
FORMATS = ("jsonl", "txt", "parquet", "hf", "training")
# Format ``training``: which of the family's splits become which of ours (its train split is never read).
TRAINING_SPLITS = {"test": "heldout", "validation": "train"}
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
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
            ``max_characters``, ``max_docs_per_label``, ``sample_seed``; format ``training``: ``path`` as
            :func:`resolve_corpus_spec` sets it, and ``splits``).

    Raises:
        CorpusError: naming the file, field or value that is wrong and the config key to fix.
    """
    fmt = spec.get("format", "jsonl")
    readers = {
        "jsonl": _read_jsonl,
        "txt": _read_txt,
        "parquet": _read_parquet,
        "hf": _read_hf,
        "training": _read_training,
    }
    if fmt not in readers:
        raise CorpusError(f"corpora.{name}.format is {fmt!r}; use one of {', '.join(FORMATS)}")
    raw, source = readers[fmt](name, spec)
    table = _normalise(name, spec, raw, source)
    table = cut_texts(table, spec.get("max_characters"))
    if fmt == "training":
        table = _drop_texts(table, _family_split_texts(name, spec, "train"))
    table = _limit_per_label(table, spec.get("max_docs_per_label"), spec.get("sample_seed"))
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


def _read_family(name: str, spec: Mapping[str, Any]) -> pl.DataFrame:
    """The training family's documents table at ``spec['path']``."""
    if "path" not in spec:
        raise CorpusError(f"corpora.{name} (format training) has no path; resolve the entry with resolve_corpus_spec")
    path = spec["path"]
    table = _read_parquet(name, spec)[0]
    missing = [c for c in ("doc_id", "text", "label", "split") if c not in table.columns]
    if missing:
        raise CorpusError(f"corpora.{name}: {path} is not a training family's corpus (no column {missing})")
    return table


def _read_training(name: str, spec: Mapping[str, Any]) -> tuple[pl.DataFrame, str]:
    """Read the family's splits named in ``spec['splits']`` (default :data:`TRAINING_SPLITS`), renamed to ours."""
    splits = dict(spec.get("splits") or TRAINING_SPLITS)
    if "train" in splits:
        raise CorpusError(f"corpora.{name}.splits names the family's train split; only test and validation are read")
    table = _read_family(name, spec)
    chosen = table.filter(pl.col("split").is_in(list(splits)))
    chosen = chosen.with_columns(pl.col("split").replace_strict(splits, return_dtype=pl.String))
    return chosen.select("doc_id", "text", "label", "split"), str(spec["path"])


def _family_split_texts(name: str, spec: Mapping[str, Any], split: str) -> set[str]:
    """Every text of one split of the family's corpus."""
    table = _read_family(name, spec)
    return set(table.filter(pl.col("split") == split)["text"].to_list())


def _drop_texts(table: pl.DataFrame, texts: set[str]) -> pl.DataFrame:
    """Leave out every document whose text is one of ``texts``."""
    return table.filter(~pl.col("text").is_in(list(texts)))


def resolve_corpus_spec(name: str, spec: Mapping[str, Any], training: Mapping[str, Any] | None) -> dict[str, Any]:
    """A corpus's config entry with what the workflow derives: format ``training`` gains the family corpus's path.

    Args:
        name: the corpus's key under ``corpora``.
        spec: its config entry.
        training: the config's ``training`` section (``None`` or empty when the config trains no family).

    Raises:
        CorpusError: naming ``training.family`` when the entry's family is not the one the config trains, or
            ``corpora.{name}.path`` when the entry names a file.
    """
    resolved = dict(spec)
    if spec.get("format") != "training":
        return resolved
    wanted = spec.get("family")
    family = (training or {}).get("family")
    if "path" in spec:
        raise CorpusError(
            f"corpora.{name} has format training, whose file is the family's corpus: remove corpora.{name}.path"
        )
    if not family:
        raise CorpusError(
            f"corpora.{name} reads the training family '{wanted}', but the config trains none: set "
            f"training.family: {wanted} (and training.corpus), or take {name} out of run.corpora"
        )
    if wanted != family:
        raise CorpusError(
            f"corpora.{name}.family is '{wanted}' but training.family is '{family}': the corpus is built by that "
            f"family's rule; set corpora.{name}.family: {family} (and rename the corpus), or take {name} out of run"
        )
    resolved["path"] = f"results/training/{family}/corpus.parquet"
    return resolved


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


def cut_texts(table: pl.DataFrame, max_characters: int | None) -> pl.DataFrame:
    """Cut every text longer than ``max_characters`` (``None``: none) with :func:`cut_text`."""
    if not max_characters:
        return table
    texts = [cut_text(text, max_characters) for text in table["text"].to_list()]
    return table.with_columns(pl.Series("text", texts, dtype=pl.String))


def cut_text(text: str, max_characters: int) -> str:
    """The longest start of ``text`` within ``max_characters`` that ends a sentence (else a word); unchanged if short.

    A sentence ends at ``.``, ``!`` or ``?`` (with closing quotes or brackets) before whitespace; when no sentence
    ends in the second half of the allowance, the text is cut at its last whitespace there instead (or mid-word
    when it has none).
    """
    if len(text) <= max_characters:
        return text
    head = text[: max_characters + 1]
    ends = [match.end() - 1 for match in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] >= max_characters // 2:
        return head[: ends[-1]].rstrip()
    space = head.rfind(" ", max_characters // 2)
    space = max(space, head.rfind("\n", max_characters // 2))
    return (head[:space] if space > 0 else text[:max_characters]).rstrip()


def _limit_per_label(table: pl.DataFrame, limit: int | None, seed: int | None = None) -> pl.DataFrame:
    """Keep at most ``limit`` documents per (label, split), in corpus order.

    Without a seed, the first ones; with one, those whose ids hash lowest under it (a sample that is stable:
    adding documents to the corpus never swaps out one already kept unless a new one hashes lower).
    """
    if not limit:
        return table
    if seed is None:
        rank = pl.int_range(pl.len()).over(["label", "split"])
    else:
        keys = [_unit_hash(f"{seed}:{doc_id}") for doc_id in table["doc_id"].to_list()]
        table = table.with_columns(pl.Series("_key", keys))
        rank = pl.col("_key").rank("ordinal").over(["label", "split"]) - 1
    return table.filter(rank < limit).drop("_key", strict=False)


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
