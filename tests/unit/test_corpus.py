"""Corpora: every reader, split assignment, provenance, and the shipped register corpus."""

import json
from pathlib import Path

import polars as pl
import pytest

from latent_atlas.corpus import COLUMNS, corpus_sha256, load_corpus_table, read_corpus, write_corpus
from latent_atlas.errors import CorpusError

REPO = Path(__file__).resolve().parents[2]
REGISTERS = {
    "narrative",
    "informational_description",
    "opinion",
    "interactive_discussion",
    "how_to",
    "informational_persuasion",
    "lyrical",
    "spoken",
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_with_all_fields(tmp_path):
    rows = [{"id": f"x{i}", "body": f"text {i}", "genre": "g", "part": "test" if i == 2 else "train"} for i in range(4)]
    path = _jsonl(tmp_path / "c.jsonl", rows)
    spec = {
        "format": "jsonl",
        "path": str(path),
        "text_field": "body",
        "label_field": "genre",
        "id_field": "id",
        "split_field": "part",
    }
    table = read_corpus("c", spec)
    assert table.columns == list(COLUMNS)
    assert table["doc_id"].to_list() == ["x0", "x1", "x2", "x3"]
    assert table["split"].to_list() == ["train", "train", "heldout", "train"]
    assert set(table["label"]) == {"g"} and set(table["source"]) == {str(path)}


def test_missing_fields_get_defaults_and_hash_splits(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"text": f"document number {i}"} for i in range(400)])
    table = read_corpus("c", {"format": "jsonl", "path": str(path), "heldout_fraction": 0.25})
    assert table["doc_id"][0] == "c-00000" and table["label"].null_count() == 400
    heldout = (table["split"] == "heldout").mean()
    assert 0.18 < heldout < 0.32
    assert read_corpus("c", {"format": "jsonl", "path": str(path), "heldout_fraction": 0.25}).equals(table)


def test_txt_file_and_folder(tmp_path):
    (tmp_path / "one.txt").write_text("first paragraph\nstill first\n\nsecond\n\n\nthird\n")
    table = read_corpus("t", {"format": "txt", "path": str(tmp_path / "one.txt")})
    assert table["text"].to_list() == ["first paragraph\nstill first", "second", "third"]
    for label in ("news", "poems"):
        (tmp_path / "dir" / label).mkdir(parents=True)
        (tmp_path / "dir" / label / "a.txt").write_text(f"an {label} text")
    table = read_corpus("t", {"format": "txt", "path": str(tmp_path / "dir")})
    assert table.select("doc_id", "label").rows() == [("news/a", "news"), ("poems/a", "poems")]


def test_parquet(tmp_path):
    pl.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).write_parquet(tmp_path / "c.parquet")
    table = read_corpus("p", {"format": "parquet", "path": str(tmp_path / "c.parquet")})
    assert table["text"].to_list() == ["a", "b"]
    (tmp_path / "bad.parquet").write_text("nope")
    with pytest.raises(CorpusError, match="not a readable parquet file"):
        read_corpus("p", {"format": "parquet", "path": str(tmp_path / "bad.parquet")})


def test_max_docs_per_label_keeps_each_split(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": ["train", "heldout"][i // 10]} for i in range(20)]
    table = read_corpus(
        "c", {"format": "jsonl", "path": str(_jsonl(tmp_path / "c.jsonl", rows)), "max_docs_per_label": 2}
    )
    counts = table.group_by("label", "split").len().sort("label", "split")
    assert counts["len"].to_list() == [2, 2, 2, 2]
    assert table["text"].to_list() == ["t0", "t1", "t2", "t3", "t10", "t11", "t12", "t13"]


@pytest.mark.parametrize(
    ("rows", "spec", "message"),
    [
        ([{"txt": "a"}], {}, r"has no field 'text' \(fields: txt\); set corpora\.c\.text_field"),
        ([{"text": "a", "doc_id": "1"}, {"text": "b", "doc_id": "1"}], {}, "duplicate document ids"),
        ([{"text": "a", "split": "eval"}], {}, r"split values \['eval'\]; use train or heldout"),
        ([{"text": None}], {}, "documents with no text"),
    ],
)
def test_bad_corpora(tmp_path, rows, spec, message):
    path = _jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(CorpusError, match=message):
        read_corpus("c", {"format": "jsonl", "path": str(path), **spec})


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(CorpusError, match=r"corpora\.c\.path: .* does not exist"):
        read_corpus("c", {"format": "jsonl", "path": str(tmp_path / "missing.jsonl")})
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2 is not valid JSON"):
        read_corpus("c", {"format": "jsonl", "path": str(tmp_path / "c.jsonl")})
    with pytest.raises(CorpusError, match="format is 'csv'"):
        read_corpus("c", {"format": "csv", "path": "x"})


def test_sha256_tracks_content(tiny_corpus):
    digest = corpus_sha256(tiny_corpus)
    assert digest == corpus_sha256(tiny_corpus.clone())
    changed = tiny_corpus.with_columns(pl.col("text").str.replace("dog", "wolf"))
    assert corpus_sha256(changed) != digest
    assert corpus_sha256(tiny_corpus.reverse()) != digest


def test_write_and_load_round_trip(tiny_corpus, tmp_path):
    meta = write_corpus(tiny_corpus, tmp_path / "c.parquet", {"format": "jsonl"})
    table, loaded_meta = load_corpus_table(tmp_path / "c.parquet")
    assert table.equals(tiny_corpus)
    assert loaded_meta == meta and meta["corpus_sha256"] == corpus_sha256(tiny_corpus)
    assert {"config_hash", "code_version", "created"} <= set(meta)
    pl.DataFrame({"text": ["a"]}).write_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(CorpusError, match="not a latent-atlas corpus table"):
        load_corpus_table(tmp_path / "foreign.parquet")
    with pytest.raises(CorpusError, match="does not exist; run `snakemake"):
        load_corpus_table(tmp_path / "none.parquet")


def test_shipped_register_corpus():
    spec = {"format": "jsonl", "path": str(REPO / "config/corpora/registers.jsonl")}
    table = read_corpus("registers", spec)
    assert set(table["label"]) == REGISTERS
    per_label = table.group_by("label").len()
    assert per_label["len"].min() >= 40
    words = [len(text.split()) for text in table["text"]]
    assert min(words) >= 40 and max(words) <= 120
    heldout = table.filter(pl.col("split") == "heldout")
    assert set(heldout["label"]) == REGISTERS
    assert 0.1 < heldout.height / table.height < 0.3
    assert table["text"].n_unique() == table.height


def test_hf_datasets_reader_plumbing(monkeypatch):
    """The `hf` format calls datasets.load_dataset with the configured names (no network in tests)."""
    import sys
    import types

    import pyarrow as pa

    calls = []

    def load_dataset(dataset, config, split, revision):
        calls.append((dataset, config, split, revision))
        table = pa.table({"sentence": ["one text", "another text"], "genre": ["x", "y"]})
        return types.SimpleNamespace(data=types.SimpleNamespace(table=table))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    spec = {
        "format": "hf",
        "dataset": "org/set",
        "config": "en",
        "hf_split": "validation",
        "text_field": "sentence",
        "label_field": "genre",
    }
    table = read_corpus("h", spec)
    assert calls == [("org/set", "en", "validation", None)]
    assert table["text"].to_list() == ["one text", "another text"]
    assert table["source"][0] == "hf:org/set/en:validation"


def test_hf_format_without_datasets_installed(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError, match=r"needs the 'datasets' package: pip install 'latent-atlas\[hf\]'"):
        read_corpus("h", {"format": "hf", "dataset": "x"})
