"""Training corpora from a streamed hub dataset labelled by a register classifier, with no network.

The dataset is a fake loader yielding dicts; the classifier is either a tiny randomly initialised
``BertForSequenceClassification`` over the word-level test tokenizer, or a stub whose probabilities are
fixed per document (keyed by the document's first word), so threshold decisions can be checked exactly.
"""

import json
import random
import re
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from latent_atlas.corpus import COLUMNS, load_corpus_table
from latent_atlas.errors import CorpusError, ModelAcquisitionError
from latent_atlas.testing import _WORDS, tiny_tokenizer
from latent_atlas.training import hub
from latent_atlas.training.classifier import RegisterClassifier, label_documents
from latent_atlas.training.debian import Settings
from latent_atlas.training.hub import (
    HubSource,
    assemble_hub_corpus,
    load_stream,
    parse_hub_source,
    stream_texts,
)
from latent_atlas.training.text import chunk_text, clean_text, parent_document

LABELS = ("NA", "HI", "IN", "OP", "MT")
LABEL_MAP = {"NA": "narrative", "HI": "how_to", "IN": "informational"}
MAPPED = [LABELS.index(label) for label in LABEL_MAP]
Toy = tuple[list[dict[str, Any]], dict[str, list[float]]]  # records and per-document stub probabilities
SETTINGS = {"min_words": 5, "max_words": 30, "splits": {"train": 0.5, "validation": 0.25, "test": 0.25}}


def make_source(**changes: Any) -> HubSource:
    values: dict[str, Any] = {
        "dataset": "toy/web",
        "name": "sample",
        "revision": "abc123",
        "max_documents": 1000,
        "classifier": "toy/register-classifier",
        "classifier_revision": "v1",
        "labels": LABEL_MAP,
        "threshold": 0.5,
        "max_length": 32,
        "batch_size": 4,
        "device": "cpu",
        "settings": SETTINGS,
    }
    values.update(changes)
    return parse_hub_source(values)


def document(key: str, words: int, rng: random.Random) -> str:
    """A document of random vocabulary words starting with ``key``, in paragraphs of up to 25 words."""
    tokens = [key] + [rng.choice(_WORDS) for _ in range(words - 1)]
    paragraphs = [" ".join(tokens[start : start + 25]) + " ." for start in range(0, len(tokens), 25)]
    return "\n\n".join(paragraphs)


class StubClassifier:
    """Fixed probabilities per document, looked up by the document's first word."""

    label_names = LABELS
    identifier = "stub"

    def __init__(self, rows: Mapping[str, list[float]], fail_after: int | None = None) -> None:
        self.rows = rows
        self.calls = 0
        self.fail_after = fail_after

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("classifier crashed")
        return torch.tensor([self.rows[text.split()[0]] for text in texts], dtype=torch.float64).reshape(
            len(texts), len(LABELS)
        )


def loader_of(records: list[dict[str, Any]]) -> Any:
    return lambda source: iter(records)


@pytest.fixture
def toy() -> Toy:
    """60 documents of 6..90 words with random probabilities, an exact duplicate, a short and an empty one."""
    rng = random.Random(7)
    records: list[dict[str, Any]] = []
    rows: dict[str, list[float]] = {}
    for n in range(60):
        key = f"d{n}"
        records.append({"text": document(key, rng.randint(6, 90), rng), "id": n})
        rows[key] = [round(rng.random(), 3) for _ in LABELS]
    records.append({"text": records[3]["text"], "id": 60})  # exact duplicate of document 3
    records.append({"text": "d61 too short", "id": 61})
    records.append({"text": None, "id": 62})
    rows["d3"] = [0.9, 0.1, 0.1, 0.1, 0.1]  # kept, so its duplicate is dropped as a duplicate
    rows["d61"] = [0.9] * len(LABELS)
    return records, rows


def expected_register(row: list[float], threshold: float) -> str | None:
    best = max(MAPPED, key=lambda column: (row[column], -column))
    return LABEL_MAP[LABELS[best]] if row[best] >= threshold else None


# --------------------------------------------------------------------------------------------------
# Configuration


def test_parse_hub_source_defaults_and_settings() -> None:
    source = parse_hub_source(
        {"dataset": "HuggingFaceFW/fineweb", "max_documents": 10, "classifier": "c", "labels": {"NA": "narrative"}}
    )
    assert (source.name, source.split, source.revision, source.text_field) == (None, "train", None, "text")
    assert (source.threshold, source.batch_size, source.max_length, source.device) == (0.5, 32, 512, "auto")
    assert source.settings == Settings()
    assert source.source_name == "hf:HuggingFaceFW/fineweb/:train"
    assert make_source().settings == Settings(**SETTINGS)
    assert parse_hub_source(source) is source


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "unknown keys colour; a hub source has the keys"),
        ({"max_documents": 0}, "max_documents is 0; set it to the number of documents"),
        ({"max_documents": True}, "max_documents is True"),
        ({"max_documents": "10"}, "max_documents is '10'"),
        ({"batch_size": 0}, "batch_size is 0"),
        ({"max_length": -1}, "max_length is -1"),
        ({"threshold": 1.5}, "threshold is 1.5; set it to a probability between 0 and 1"),
        ({"threshold": "high"}, "threshold is 'high'"),
        ({"labels": {}}, "labels is {}; map the classifier labels"),
        ({"labels": ["NA"]}, "labels is \\['NA'\\]"),
        ({"labels": {"NA": ""}}, "labels has entries 'NA': ''"),
        ({"dataset": ""}, "dataset is ''; set it to a non-empty string"),
        ({"name": ""}, "name is ''"),
        ({"text_field": None}, "text_field is None"),
        ({"activation": "relu"}, "activation is 'relu'; use one of auto, sigmoid, softmax"),
        ({"device": "gpu0"}, "device 'gpu0' is not a device"),
        ({"settings": {"window": 3}}, "unknown settings \\['window'\\]"),
        ({"settings": {"splits": {"train": 0.5}}}, "settings.splits"),
    ],
)
def test_parse_hub_source_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        make_source(**changes)


def test_parse_hub_source_names_missing_keys() -> None:
    with pytest.raises(CorpusError, match=r"missing max_documents, classifier, labels.*required: dataset"):
        parse_hub_source({"dataset": "toy/web"})


# --------------------------------------------------------------------------------------------------
# Streaming


def test_stream_texts_reads_only_max_documents() -> None:
    pulled = []

    def endless(source: HubSource) -> Iterator[dict[str, Any]]:
        n = 0
        while True:
            pulled.append(n)
            yield {"text": f"document {n}", "url": "x"}
            n += 1

    texts = list(stream_texts(make_source(max_documents=3), endless))
    assert texts == ["document 0", "document 1", "document 2"]
    assert pulled == [0, 1, 2]


def test_stream_texts_text_field_errors() -> None:
    records = [{"body": "a"}, {"content": "b"}]
    assert list(stream_texts(make_source(text_field="body", max_documents=1), loader_of(records))) == ["a"]
    with pytest.raises(CorpusError, match=r"record 0 of toy/web has no field 'text' \(fields: body\).*text_field"):
        list(stream_texts(make_source(), loader_of(records)))
    with pytest.raises(CorpusError, match=r"record 1 .*no field 'body' \(fields: content\); set text_field"):
        list(stream_texts(make_source(text_field="body"), loader_of(records)))
    with pytest.raises(CorpusError, match="'text' is a int, not a string; set text_field"):
        list(stream_texts(make_source(), loader_of([{"text": 3}])))
    assert list(stream_texts(make_source(), loader_of([{"text": None}]))) == [""]


def test_missing_datasets_names_pip_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CorpusError, match="pip install datasets"):
        load_stream(make_source())
    with pytest.raises(CorpusError, match="pip install datasets"):
        next(stream_texts(make_source()))
    with pytest.raises(CorpusError, match="pip install datasets"):
        assemble_hub_corpus(make_source(), tmp_path / "c.parquet", tmp_path / "m.json", classifier=StubClassifier({}))
    assert list(tmp_path.iterdir()) == []


def test_default_loader_streams_with_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, name: str | None = None, **options: Any) -> Iterator[dict[str, str]]:
        calls.append((path, name, options))
        if path == "missing/dataset":
            raise FileNotFoundError("Dataset 'missing/dataset' doesn't exist on the Hub")
        return iter([{"text": "one"}, {"text": "two"}, {"text": "three"}])

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert list(stream_texts(make_source(max_documents=2, split="train"))) == ["one", "two"]
    assert calls == [("toy/web", "sample", {"split": "train", "revision": "abc123", "streaming": True})]
    with pytest.raises(CorpusError, match=r"could not open the dataset 'missing/dataset'.*doesn't exist"):
        load_stream(make_source(dataset="missing/dataset"))


# --------------------------------------------------------------------------------------------------
# The classifier


def tiny_classifier(problem_type: str | None = "multi_label_classification", seed: int = 0) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(LABELS)),
        problem_type=problem_type,
    )
    return BertForSequenceClassification(config), tokenizer


TEXTS = [
    "the dog saw the cat .",
    "a small red house was by the river and the city was new " * 6,  # longer than max_length tokens
    "one day",
    "people said the world was old , but the city was new .",
    "unknownword the water",
]


def reference(model: Any, tokenizer: Any, texts: list[str], batch_size: int, activation: str) -> torch.Tensor:
    """The model's own sigmoid / softmax of its logits, batch by batch as the classifier reads them."""
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=32, return_tensors="pt"
            )
            logits = model(**encoded).logits
            out.append(torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=-1))
    return torch.cat(out)


@pytest.mark.parametrize(
    ("problem_type", "activation", "expected"),
    [
        ("multi_label_classification", "auto", "sigmoid"),
        ("single_label_classification", "auto", "softmax"),
        (None, "auto", "softmax"),
        (None, "sigmoid", "sigmoid"),
    ],
)
def test_probabilities_equal_the_models_own(problem_type: str | None, activation: str, expected: str) -> None:
    model, tokenizer = tiny_classifier(problem_type)
    model.train()
    classifier = RegisterClassifier(model, tokenizer, batch_size=2, max_length=32, activation=activation, device="cpu")
    assert not model.training
    assert classifier.label_names == LABELS
    assert classifier.activation == expected
    probs = classifier.probabilities(TEXTS)
    assert probs.shape == (len(TEXTS), len(LABELS)) and probs.dtype == torch.float32
    assert torch.equal(probs, reference(model, tokenizer, TEXTS, 2, expected))
    if expected == "softmax":
        assert torch.allclose(probs.sum(dim=1), torch.ones(len(TEXTS)))
    else:
        assert not torch.allclose(probs.sum(dim=1), torch.ones(len(TEXTS)))
    assert classifier.probabilities([]).shape == (0, len(LABELS))


def test_classifier_from_a_saved_directory(tmp_path: Path) -> None:
    model, tokenizer = tiny_classifier()
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    source = make_source(classifier=str(tmp_path / "clf"), classifier_revision=None)
    loaded = RegisterClassifier.from_source(source)
    assert not loaded.model.training and loaded.device == torch.device("cpu")
    assert loaded.label_names == LABELS and loaded.activation == "sigmoid"
    assert (loaded.identifier, loaded.batch_size, loaded.max_length) == (str(tmp_path / "clf"), 4, 32)
    weights, reloaded = model.state_dict(), loaded.model.state_dict()
    assert weights.keys() == reloaded.keys() and all(torch.equal(weights[k], reloaded[k]) for k in weights)
    # Same weights and inputs; the reloaded tensors' memory layout can move the last bit of a float32.
    expected = reference(model, tokenizer, TEXTS, 4, "sigmoid")
    torch.testing.assert_close(loaded.probabilities(TEXTS), expected, rtol=0, atol=1e-6)

    with pytest.raises(CorpusError, match=r"labels maps \['XX'\].*its labels are NA, HI, IN, OP, MT"):
        RegisterClassifier.from_source(make_source(classifier=str(tmp_path / "clf"), labels={"XX": "narrative"}))
    with pytest.raises(ModelAcquisitionError, match=r"could not load the classifier .*nowhere.*set classifier"):
        RegisterClassifier.from_pretrained(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------------
# Labelling


def test_label_documents_threshold_is_exact_and_ignores_unmapped_labels() -> None:
    rows = {
        #     NA    HI      IN   OP    MT
        "d0": [0.5, 0.1, 0.1, 0.0, 0.0],  # at the threshold: kept
        "d1": [0.1, 0.49999, 0.1, 0.0, 0.0],  # just below: dropped
        "d2": [0.2, 0.1, 0.6, 0.99, 0.0],  # an unmapped label is most probable: the best mapped one counts
        "d3": [0.1, 0.1, 0.1, 0.0, 0.9],  # only an unmapped label passes: dropped
        "d4": [0.7, 0.7, 0.1, 0.0, 0.0],  # a tie: the first label in the classifier's order
        "d5": [0.0, 0.75, 0.2, 0.0, 0.0],
    }
    texts = [f"{key} text" for key in rows]
    table, counts = label_documents(texts, StubClassifier(rows), make_source(threshold=0.5))
    assert table.to_dicts() == [
        {"index": 0, "text": "d0 text", "label": "NA", "register": "narrative", "probability": 0.5},
        {"index": 2, "text": "d2 text", "label": "IN", "register": "informational", "probability": 0.6},
        {"index": 4, "text": "d4 text", "label": "NA", "register": "narrative", "probability": 0.7},
        {"index": 5, "text": "d5 text", "label": "HI", "register": "how_to", "probability": 0.75},
    ]
    assert counts == {"classified": 6, "below_threshold": 2, "kept": {"how_to": 1, "informational": 1, "narrative": 2}}
    empty, counts = label_documents([], StubClassifier(rows), make_source())
    assert empty.height == 0 and counts == {"classified": 0, "below_threshold": 0, "kept": {}}


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.62, 1.0])
def test_label_documents_keeps_exactly_the_documents_at_or_above_the_threshold(threshold: float) -> None:
    rng = random.Random(threshold)
    rows = {f"d{n}": [round(rng.random(), 2) for _ in LABELS] for n in range(300)}
    rows["d0"] = [threshold, 0.0, 0.0, 1.0, 1.0]
    texts = [f"{key} words" for key in rows]
    table, counts = label_documents(texts, StubClassifier(rows), make_source(threshold=threshold))
    expected = {i: expected_register(rows[text.split()[0]], threshold) for i, text in enumerate(texts)}
    kept = {i: register for i, register in expected.items() if register is not None}
    assert dict(zip(table["index"], table["register"], strict=True)) == kept
    assert 0 in kept
    assert set(table["label"]) <= set(LABEL_MAP) and set(table["register"]) <= set(LABEL_MAP.values())
    assert (table["probability"] >= threshold).all()
    assert counts["below_threshold"] == len(texts) - len(kept)


def test_label_documents_rejects_labels_the_classifier_lacks() -> None:
    source = make_source(labels={"NA": "narrative", "dtp": "how_to", "LY": "lyrical"})
    with pytest.raises(CorpusError, match=r"labels maps \['dtp', 'LY'\].*its labels are NA, HI, IN, OP, MT"):
        label_documents(["d0 a"], StubClassifier({"d0": [0.0] * 5}), source)


# --------------------------------------------------------------------------------------------------
# Assembly


def test_assemble_hub_corpus(tmp_path: Path, toy: Toy) -> None:
    records, rows = toy
    source = make_source(threshold=0.55)
    corpus_path, manifest_path = tmp_path / "out" / "hub.parquet", tmp_path / "out" / "hub.json"
    manifest = assemble_hub_corpus(source, corpus_path, manifest_path, loader_of(records), StubClassifier(rows))
    table, meta = load_corpus_table(corpus_path)
    assert table.columns == list(COLUMNS)

    # Ids, sources and splits: every piece of a document is in its document's split.
    assert all(re.fullmatch(r"hub:toy/web:\d+(\.\d+)?", doc_id) for doc_id in table["doc_id"])
    assert set(table["source"]) == {"hf:toy/web/sample:train"}
    parents = table.with_columns(pl.col("doc_id").map_elements(parent_document, return_dtype=pl.String).alias("p"))
    assert parents.group_by("p").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(table["split"]) == {"train", "validation", "test"}

    # Exactly the documents whose best mapped label reaches the threshold, with its register.
    expected = {}
    for n in range(60):
        register = expected_register(rows[f"d{n}"], 0.55)
        if register is not None:
            expected[f"hub:toy/web:{n}"] = register
    found = dict(zip(parents["p"], parents["label"], strict=True))
    assert found == expected
    assert set(table["label"]) <= set(LABEL_MAP.values())

    # Pieces: within the word limits, and together the whole cleaned document.
    words = table["text"].map_elements(lambda text: len(text.split()), return_dtype=pl.Int64)
    assert words.min() >= SETTINGS["min_words"] and words.max() <= SETTINGS["max_words"]
    for parent, group in parents.group_by("p", maintain_order=True):
        n = int(parent[0].rsplit(":", 1)[1])
        pieces = group.sort(pl.col("doc_id").str.extract(r"\.(\d+)$").cast(pl.Int64))["text"].to_list()
        assert pieces == chunk_text(clean_text(records[n]["text"]), SETTINGS["max_words"])
        assert (len(pieces) == 1) == (group["doc_id"][0] == parent[0])

    # The manifest.
    written = json.loads(manifest_path.read_text())
    assert written == json.loads(json.dumps(manifest))
    assert written["corpus"] == "hub.parquet" and written["corpus_sha256"] == meta["corpus_sha256"]
    assert (written["dataset"], written["name"], written["split"], written["revision"]) == (
        "toy/web",
        "sample",
        "train",
        "abc123",
    )
    assert (written["classifier"], written["classifier_revision"]) == ("toy/register-classifier", "v1")
    assert written["labels"] == LABEL_MAP and written["threshold"] == 0.55
    assert written["classifier_labels"] == list(LABELS)
    counts = written["counts"]
    assert counts["read"] == len(records) and counts["too_short"] == 2
    assert counts["classified"] == len(records) - 2
    assert counts["below_threshold"] == 60 - len(expected)
    assert sum(counts["kept"].values()) == len(expected) + 1  # the duplicate passes the classifier
    assert counts["dropped_pieces"] == {"exact_duplicate": len(chunk_text(clean_text(records[3]["text"]), 30))}
    assert written["totals"]["documents"] == table.height
    assert written["totals"]["words"] == int(words.sum())
    for register, entry in written["registers"].items():
        assert entry["documents"] == table.filter(pl.col("label") == register).height
        assert entry["labels"] == [label for label, reg in LABEL_MAP.items() if reg == register]
        if entry["documents"]:
            assert 0.55 <= entry["probability"]["min"] <= entry["probability"]["max"] <= 1
    assert set(written["provenance"]) >= {"config_hash", "code_version", "created"}
    assert written["settings"]["max_words"] == 30


def test_max_documents_and_register_cap(tmp_path: Path, toy: Toy) -> None:
    records, rows = toy
    uncapped_path = tmp_path / "all.parquet"
    source = make_source(max_documents=40, threshold=0.3)
    assemble_hub_corpus(source, uncapped_path, tmp_path / "all.json", loader_of(records), StubClassifier(rows))
    uncapped, _ = load_corpus_table(uncapped_path)
    assert max(int(parent_document(d).rsplit(":", 1)[1]) for d in uncapped["doc_id"]) < 40

    capped_source = make_source(max_documents=40, threshold=0.3, settings={**SETTINGS, "max_words_per_register": 120})
    manifest = assemble_hub_corpus(
        capped_source, tmp_path / "cap.parquet", tmp_path / "cap.json", loader_of(records), StubClassifier(rows)
    )
    capped, _ = load_corpus_table(tmp_path / "cap.parquet")
    assert manifest["counts"]["read"] == 40 and manifest["counts"]["dropped_pieces"]["register_cap"] > 0
    for register in LABEL_MAP.values():
        mine = capped.filter(pl.col("label") == register)
        assert sum(len(text.split()) for text in mine["text"]) <= 120
    # Whole documents are kept or dropped: a capped corpus's documents have all their pieces.
    pieces = uncapped.group_by(pl.col("doc_id").map_elements(parent_document, return_dtype=pl.String)).len()
    capped_pieces = capped.group_by(pl.col("doc_id").map_elements(parent_document, return_dtype=pl.String)).len()
    assert set(capped_pieces.iter_rows()) <= set(pieces.iter_rows())


def test_assemble_with_a_real_classifier(tmp_path: Path) -> None:
    model, tokenizer = tiny_classifier()
    classifier = RegisterClassifier(model, tokenizer, max_length=32, device="cpu", identifier="tiny")
    rng = random.Random(1)
    texts = [document(rng.choice(_WORDS), rng.randint(8, 60), rng) for _ in range(24)]
    source = make_source(threshold=0.7, settings={**SETTINGS, "near_duplicate_threshold": 1.0})
    manifest = assemble_hub_corpus(
        source, tmp_path / "c.parquet", tmp_path / "m.json", loader_of([{"text": t} for t in texts]), classifier
    )
    cleaned = [clean_text(text) for text in texts]
    probs = classifier.probabilities(cleaned).double()[:, MAPPED]
    best, column = probs.max(dim=1)
    expected = {
        f"hub:toy/web:{n}": LABEL_MAP[LABELS[MAPPED[int(column[n])]]]
        for n in range(len(texts))
        if float(best[n]) >= 0.7
    }
    table, _ = load_corpus_table(tmp_path / "c.parquet")
    found = dict(
        zip(table["doc_id"].map_elements(parent_document, return_dtype=pl.String), table["label"], strict=True)
    )
    assert found == expected and 0 < len(expected) < len(texts)
    assert manifest["activation"] == "sigmoid" and manifest["classifier_labels"] == list(LABELS)


# --------------------------------------------------------------------------------------------------
# Errors leave nothing behind


def test_unknown_label_fails_before_reading(tmp_path: Path) -> None:
    read = []
    source = make_source(labels={"NA": "narrative", "SP": "spoken"})
    with pytest.raises(CorpusError, match=r"labels maps \['SP'\].*its labels are NA, HI, IN, OP, MT"):
        assemble_hub_corpus(
            source, tmp_path / "c.parquet", tmp_path / "m.json", lambda s: read.append(1) or [], StubClassifier({})
        )
    assert read == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["missing_field", "classifier", "manifest", "nothing_left"])
def test_errors_mid_way_leave_no_output(
    failure: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toy: Toy,
) -> None:
    records, rows = toy
    records = [dict(record) for record in records]
    classifier = StubClassifier(rows)
    source = make_source(batch_size=2)  # groups of 16 documents: the failures come after some were classified
    message = {
        "missing_field": "record 40 of toy/web has no field 'text'",
        "classifier": "classifier crashed",
        "manifest": "disk full",
        "nothing_left": "no documents are left of the 63 read from toy/web",
    }[failure]
    if failure == "missing_field":
        records[40] = {"body": records[40]["text"]}
    elif failure == "classifier":
        classifier = StubClassifier(rows, fail_after=2)
    elif failure == "nothing_left":
        source = make_source(threshold=1.0)

    def no_room(path: Path, payload: Any) -> None:
        Path(path).write_text("{half")
        raise OSError("disk full")

    if failure == "manifest":
        monkeypatch.setattr(hub, "write_json", no_room)
    out = tmp_path / "out"
    out.mkdir()
    (out / "hub.json").write_text("previous manifest")
    with pytest.raises((CorpusError, RuntimeError, OSError), match=message):
        assemble_hub_corpus(source, out / "hub.parquet", out / "hub.json", loader_of(records), classifier)
    assert sorted(path.name for path in out.iterdir()) == ["hub.json"]
    assert (out / "hub.json").read_text() == "previous manifest"
