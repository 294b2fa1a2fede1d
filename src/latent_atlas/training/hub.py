"""Register-labelled training corpora from a Hugging Face dataset, labelled by a register classifier.

The online counterpart of :mod:`latent_atlas.training.debian`. A :class:`HubSource` names a dataset on the
Hugging Face hub (read as a stream, e.g. ``HuggingFaceFW/fineweb`` config ``sample-10BT``) and a sequence
classifier (any ``AutoModelForSequenceClassification``, e.g. a TurkuNLP web-register classifier) whose labels
``labels`` maps onto register names. :func:`assemble_hub_corpus` reads the first ``max_documents`` documents,
cleans them, labels each with the mapped classifier label of highest probability and keeps it when that
probability reaches ``threshold``; then, as for the Debian source, it cuts long documents into pieces,
removes exact and near duplicates, caps the words per register and assigns each document to ``train`` /
``validation`` / ``test`` by a stable hash of its id (all pieces of one document land in the same split).
It writes the same documents table (:func:`latent_atlas.corpus.write_corpus`) and a manifest JSON, both
atomically, so everything downstream treats both sources the same.

Document ids are ``hub:<dataset>:<n>`` for the ``n``-th document of the stream (counting from 0, including
documents that were dropped) and ``hub:<dataset>:<n>.<k>`` for its ``k``-th piece when it was cut.
"""

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl
import torch

from latent_atlas.corpus import COLUMNS, write_corpus
from latent_atlas.errors import CorpusError
from latent_atlas.provenance import atomic_output, provenance_record, write_json
from latent_atlas.training.classifier import (
    ACTIVATIONS,
    Classifier,
    RegisterClassifier,
    check_label_map,
    label_documents,
)
from latent_atlas.training.debian import Settings, parse_settings
from latent_atlas.training.text import (
    DocumentPiece,
    assign_split,
    cap_pieces,
    clean_text,
    deduplicate,
    document_pieces,
    parent_document,
    tally,
    word_count,
)

Loader = Callable[["HubSource"], Iterable[Mapping[str, Any]]]

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class HubSource:
    """A streamed Hugging Face dataset and the register classifier that labels its documents.

    Attributes:
        dataset: the dataset id on the hub (``HuggingFaceFW/fineweb``) or a local dataset directory.
        max_documents: read at most this many documents from the stream (before any filtering).
        classifier: the classifier's model id on the hub, or a local directory with ``config.json``.
        labels: classifier label name -> register name; only mapped labels count, several labels may map
            to one register.
        name: the dataset config (``sample-10BT``), if it has several.
        split: the dataset split to stream.
        revision: pin the dataset to a git revision (branch, tag or commit); the default branch if absent.
        text_field: the field of each record that holds the document's text.
        classifier_revision: pin the classifier to a git revision.
        threshold: keep a document when its best mapped label's probability is at least this.
        batch_size: documents per classifier forward pass.
        max_length: the classifier reads at most this many tokens of each document (the beginning).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        activation: ``auto`` (sigmoid when the classifier's ``problem_type`` is
            ``multi_label_classification``, else softmax), ``sigmoid`` or ``softmax``.
        settings: cleaning, cutting, deduplication, balance and split settings, as for the Debian source
            (``group_words`` and ``copyright_excerpt_lines`` do not apply here).
    """

    dataset: str
    max_documents: int
    classifier: str
    labels: Mapping[str, str]
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    text_field: str = "text"
    classifier_revision: str | None = None
    threshold: float = 0.5
    batch_size: int = 32
    max_length: int = 512
    device: str = "auto"
    activation: str = "auto"
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        for key in ("dataset", "classifier", "split", "text_field", "device"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise CorpusError(f"hub source: {key} is {getattr(self, key)!r}; set it to a non-empty string")
        for key in ("name", "revision", "classifier_revision"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise CorpusError(f"hub source: {key} is {value!r}; set it to a non-empty string or leave it out")
        for key, fix in (
            ("max_documents", "the number of documents to read from the stream"),
            ("batch_size", "the documents per classifier forward pass"),
            ("max_length", "the tokens the classifier reads of each document"),
        ):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise CorpusError(f"hub source: {key} is {value!r}; set it to {fix} (an integer >= 1)")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise CorpusError(f"hub source: threshold is {threshold!r}; set it to a probability between 0 and 1")
        if self.activation not in ACTIVATIONS:
            raise CorpusError(f"hub source: activation is {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as error:
                raise CorpusError(
                    f"hub source: device {self.device!r} is not a device; use auto, cpu or cuda"
                ) from error
        object.__setattr__(self, "labels", _label_map(self.labels))
        object.__setattr__(self, "settings", parse_settings(self.settings))

    @property
    def source_name(self) -> str:
        """The ``source`` column of the corpus table: ``hf:<dataset>/<name>:<split>``."""
        return f"hf:{self.dataset}/{self.name or ''}:{self.split}"


def _is_int(value: Any) -> bool:
    """Return whether ``value`` is an int (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _label_map(labels: Any) -> dict[str, str]:
    """Validate the ``labels`` mapping (classifier label -> register)."""
    example = "e.g. {NA: narrative, HI: how_to}"
    if not isinstance(labels, Mapping) or not labels:
        raise CorpusError(
            f"hub source: labels is {labels!r}; map the classifier labels to keep onto register names ({example})"
        )
    bad = [f"{k!r}: {v!r}" for k, v in labels.items() if not (isinstance(k, str) and k and isinstance(v, str) and v)]
    if bad:
        raise CorpusError(f"hub source: labels has entries {', '.join(bad)}; keys and values are non-empty strings")
    return dict(labels)


def parse_hub_source(values: Mapping[str, Any] | HubSource) -> HubSource:
    """Validate a hub source from config, failing with a message that names the key and the fix."""
    if isinstance(values, HubSource):
        return values
    if not isinstance(values, Mapping):
        raise CorpusError(f"hub source is {values!r}; it is a mapping with dataset, max_documents, classifier, labels")
    known = {spec.name for spec in fields(HubSource)}
    required = [spec.name for spec in fields(HubSource) if spec.default is MISSING and spec.default_factory is MISSING]
    unknown = sorted(set(values) - known)
    missing = [key for key in required if key not in values]
    if unknown or missing:
        raise CorpusError(
            "training.corpus (hub source): "
            + (f"unknown keys {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}")
            + f"; a hub source has the keys {', '.join(sorted(known))} (required: {', '.join(required)})"
        )
    entries = dict(values)
    if "settings" in entries:
        entries["settings"] = parse_settings(entries["settings"])
    return HubSource(**entries)


# --------------------------------------------------------------------------------------------------
# Streaming


def load_stream(source: HubSource) -> Iterable[Mapping[str, Any]]:
    """Open the dataset as a stream with ``datasets.load_dataset(..., streaming=True)`` (needs internet).

    Raises:
        CorpusError: if ``datasets`` is not installed, or the dataset, config, split or revision cannot be opened.
    """
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise CorpusError(
            "reading a dataset from the Hugging Face hub needs the 'datasets' package: "
            "pip install datasets (or pip install 'latent-atlas[hf]')"
        ) from error
    try:
        return load_dataset(source.dataset, source.name, split=source.split, revision=source.revision, streaming=True)
    except Exception as error:  # datasets raises many kinds (not found, no network, bad config name)
        raise CorpusError(
            f"could not open the dataset {source.dataset!r} (name {source.name!r}, split {source.split!r}, "
            f"revision {source.revision!r}): {error}; check dataset, name, split and revision, and network access"
        ) from error


def stream_texts(source: HubSource, loader: Loader | None = None) -> Iterator[str]:
    """Yield the text of each of the first ``max_documents`` records of the stream.

    ``loader(source)`` returns the records (mappings); :func:`load_stream` by default. A record whose text
    is ``None`` yields ``""`` (dropped later as too short).

    Raises:
        CorpusError: naming ``text_field`` when a record has no such field, or its value is not a string.
    """
    records = (loader or load_stream)(source)
    for n, record in enumerate(itertools.islice(records, source.max_documents)):
        if not isinstance(record, Mapping) or source.text_field not in record:
            fields = ", ".join(map(str, record)) if isinstance(record, Mapping) else type(record).__name__
            raise CorpusError(
                f"record {n} of {source.dataset} has no field {source.text_field!r} (fields: {fields}); "
                "set text_field to the field that holds the text"
            )
        text = record[source.text_field]
        if text is None:
            yield ""
        elif isinstance(text, str):
            yield text
        else:
            raise CorpusError(
                f"record {n} of {source.dataset}: field {source.text_field!r} is a {type(text).__name__}, "
                "not a string; set text_field to the field that holds the text"
            )


# --------------------------------------------------------------------------------------------------
# Assembly


@dataclass
class _Labelled:
    """The documents kept by the classifier, with their stream position, and the document counts."""

    documents: list[tuple[int, str, str, float]] = field(default_factory=list)  # (n, text, register, probability)
    read: int = 0
    too_short: int = 0
    classified: int = 0
    below_threshold: int = 0


def _classify_stream(texts: Iterable[str], classifier: Classifier, source: HubSource) -> _Labelled:
    """Clean the streamed texts and classify, in groups, those with at least ``min_words`` words."""
    result = _Labelled()
    group: list[tuple[int, str]] = []

    def flush() -> None:
        table, counts = label_documents([text for _, text in group], classifier, source)
        for index, _, register, probability in table.select("index", "text", "register", "probability").iter_rows():
            n, text = group[index]
            result.documents.append((n, text, register, probability))
        result.classified += counts["classified"]
        result.below_threshold += counts["below_threshold"]
        group.clear()

    for n, raw in enumerate(texts):
        result.read += 1
        text = clean_text(raw)
        if word_count(text) < source.settings.min_words:
            result.too_short += 1
            continue
        group.append((n, text))
        if len(group) >= 8 * source.batch_size:
            flush()
    if group:
        flush()
    return result


def _pieces(labelled: _Labelled, settings: Settings) -> list[DocumentPiece]:
    """Cut the kept documents into pieces; pieces under ``min_words`` are marked ``too_short``."""
    return [
        piece
        for n, text, register, _ in labelled.documents
        for piece in document_pieces(text, n, settings.max_words, settings.min_words, register=register)
    ]


def assemble_hub_corpus(
    source: HubSource | Mapping[str, Any],
    corpus_path: str | Path,
    manifest_path: str | Path,
    loader: Loader | None = None,
    classifier: Classifier | None = None,
) -> dict[str, Any]:
    """Build the corpus table and its manifest from a streamed hub dataset and a register classifier.

    Args:
        source: the hub source (parsed or as a config mapping).
        corpus_path: the documents table (columns :data:`~latent_atlas.corpus.COLUMNS`, with provenance).
        manifest_path: the manifest JSON.
        loader: returns the dataset's records for the source; :func:`load_stream` by default.
        classifier: labels the documents; loaded with :meth:`RegisterClassifier.from_source` by default.

    Both outputs appear only once everything has succeeded; on an error neither is written (existing
    ones are kept untouched).

    Returns:
        The manifest.

    Raises:
        CorpusError: for a bad source, a record without ``text_field``, labels the classifier lacks, or
            when no document is left.
    """
    source = parse_hub_source(source)
    settings = source.settings
    if classifier is None:
        classifier = RegisterClassifier.from_source(source)
    check_label_map(source.labels, list(classifier.label_names), getattr(classifier, "identifier", None))
    labelled = _classify_stream(stream_texts(source, loader), classifier, source)
    pieces = _pieces(labelled, settings)
    deduplicate(pieces, settings)
    if settings.max_words_per_register:
        for register in dict.fromkeys(piece.register for piece in pieces):
            cap_pieces(
                [piece for piece in pieces if piece.register == register],
                lambda piece: piece.doc_id("hub", source.dataset, whole=True),
                settings.max_words_per_register,
                settings.split_salt,
                "register_cap",
            )
    kept = [piece for piece in pieces if piece.drop is None]
    if not kept:
        raise CorpusError(
            f"no documents are left of the {labelled.read} read from {source.dataset} ({labelled.too_short} too "
            f"short, {labelled.below_threshold} below the threshold {source.threshold}); raise max_documents, "
            "lower threshold, map more labels in labels, or lower settings.min_words"
        )
    ids = [piece.doc_id("hub", source.dataset) for piece in kept]
    splits = [assign_split(parent_document(doc_id), settings.splits, settings.split_salt) for doc_id in ids]
    table = pl.DataFrame(
        {
            "doc_id": ids,
            "text": [piece.text for piece in kept],
            "label": [piece.register for piece in kept],
            "split": splits,
            "source": [source.source_name] * len(kept),
        },
        schema=dict.fromkeys(COLUMNS, pl.String),
    )
    spec = {"kind": "hub", "source": asdict(source)}
    corpus_path, manifest_path = Path(corpus_path), Path(manifest_path)
    with atomic_output(corpus_path) as tmp_corpus, atomic_output(manifest_path) as tmp_manifest:
        meta = write_corpus(table, tmp_corpus, spec)
        manifest = _manifest(source, classifier, labelled, pieces, kept, splits, meta, corpus_path)
        write_json(tmp_manifest, manifest)
    return manifest


def _probabilities(values: Sequence[float]) -> dict[str, float | None]:
    """Summarise kept documents' probabilities."""
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": math.fsum(values) / len(values), "max": max(values)}


def _manifest(
    source: HubSource,
    classifier: Classifier,
    labelled: _Labelled,
    pieces: Sequence[DocumentPiece],
    kept: Sequence[DocumentPiece],
    splits: Sequence[str],
    meta: Mapping[str, Any],
    corpus_path: Path,
) -> dict[str, Any]:
    """Describe the corpus: dataset, classifier, label map, counts per stage and per register, totals."""
    dropped = Counter(piece.drop for piece in pieces if piece.drop)
    kept_documents = Counter(register for _, _, register, _ in labelled.documents)
    registers: dict[str, Any] = {}
    for register in sorted(set(source.labels.values())):
        mine = [(p, s) for p, s in zip(kept, splits, strict=True) if p.register == register]
        probs = [probability for _, _, reg, probability in labelled.documents if reg == register]
        registers[register] = {
            "labels": sorted(label for label, reg in source.labels.items() if reg == register),
            "documents_classified": kept_documents.get(register, 0),
            "probability": _probabilities(probs),
            **tally((p for p, _ in mine), (s for _, s in mine)),
        }
    return {
        "kind": "hub",
        "corpus": corpus_path.name,
        "corpus_sha256": meta["corpus_sha256"],
        "columns": list(COLUMNS),
        "document_ids": "hub:<dataset>:<n> for the n-th document of the stream; hub:<dataset>:<n>.<k> for its k-th "
        "piece; all pieces of a document share its split",
        "dataset": source.dataset,
        "name": source.name,
        "split": source.split,
        "revision": source.revision,
        "text_field": source.text_field,
        "max_documents": source.max_documents,
        "classifier": source.classifier,
        "classifier_revision": source.classifier_revision,
        "classifier_commit": getattr(classifier, "commit", None),
        "classifier_labels": list(classifier.label_names),
        "activation": getattr(classifier, "activation", source.activation),
        "max_length": source.max_length,
        "labels": dict(source.labels),
        "threshold": source.threshold,
        "counts": {
            "read": labelled.read,
            "too_short": labelled.too_short,
            "classified": labelled.classified,
            "below_threshold": labelled.below_threshold,
            "kept": {register: kept_documents[register] for register in sorted(kept_documents)},
            "pieces": len(pieces),
            "dropped_pieces": {reason: dropped[reason] for reason in sorted(dropped)},
        },
        "registers": registers,
        "totals": tally(kept, splits),
        "settings": asdict(source.settings),
        "provenance": provenance_record({"kind": "hub", "source": asdict(source)}),
    }
