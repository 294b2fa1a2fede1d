"""Format ``training``: the training family's unseen splits as an analysis corpus (config key corpora.debian)."""

import copy
import hashlib
from pathlib import Path

import polars as pl
import pytest

from latent_atlas.config import ConfigError, load_yaml, validate_config
from latent_atlas.corpus import cut_text, read_corpus, resolve_corpus_spec, write_corpus
from latent_atlas.errors import CorpusError

REPO = Path(__file__).resolve().parents[2]
REGISTERS = ("narrative", "informational_description", "how_to")
# documents per (register, family split) in the planted family corpus
SIZES = {"train": 30, "validation": 7, "test": 5}


def _sentence(register: str, split: str, n: int) -> str:
    return f"This is {register} text number {n} of the {split} split. It has a second sentence."


def _family_table(sizes: dict[str, int] = SIZES) -> pl.DataFrame:
    """A family corpus as assemble_corpus writes it: ids deb:<source>:<n>, three splits, registers as labels."""
    rows = []
    for register in REGISTERS:
        for split, count in sizes.items():
            for n in range(count):
                rows.append(
                    {
                        "doc_id": f"deb:{register}-{split}:{n}",
                        "text": _sentence(register, split, n),
                        "label": register,
                        "split": split,
                        "source": f"pkg-{register}",
                    }
                )
    return pl.DataFrame(rows)


def _write_family(tmp_path: Path, table: pl.DataFrame) -> Path:
    path = tmp_path / "results" / "training" / "fam" / "corpus.parquet"
    path.parent.mkdir(parents=True)
    write_corpus(table, path, {"family": "fam"})
    return path


def _spec(path: Path, **extra) -> dict:
    return {"format": "training", "family": "fam", "path": str(path), **extra}


def _expected_sample(table: pl.DataFrame, limit: int, seed: int) -> set[str]:
    """The ids a seeded sample keeps, recomputed here: lowest sha256(f'{seed}:{id}') per (label, split)."""
    kept = set()
    for (_, _), group in table.group_by(["label", "split"]):
        ids = sorted(group["doc_id"].to_list(), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8])
        kept |= set(ids[:limit])
    return kept


def test_reads_only_the_unseen_splits_with_their_registers(tmp_path):
    family = _family_table()
    table = read_corpus("debian", _spec(_write_family(tmp_path, family)))
    counts = {(label, split): n for label, split, n in table.group_by(["label", "split"]).len().iter_rows()}
    expected = {"heldout": SIZES["test"], "train": SIZES["validation"]}
    assert counts == {(r, s): expected[s] for r in REGISTERS for s in expected}
    joined = table.join(family, on="doc_id", suffix="_family")
    assert joined.height == table.height
    assert joined["label"].to_list() == joined["label_family"].to_list()
    mapped = {"test": "heldout", "validation": "train"}
    assert [mapped[s] for s in joined["split_family"].to_list()] == joined["split"].to_list()
    assert joined["text"].to_list() == joined["text_family"].to_list()


def test_no_text_of_the_family_train_split_is_kept(tmp_path):
    family = _family_table()
    train_text = family.filter(pl.col("split") == "train")["text"][0]
    leaked_id = family.filter(pl.col("split") == "test")["doc_id"][0]
    family = family.with_columns(
        pl.when(pl.col("doc_id") == leaked_id).then(pl.lit(train_text)).otherwise("text").alias("text")
    )
    table = read_corpus("debian", _spec(_write_family(tmp_path, family)))
    train_texts = set(family.filter(pl.col("split") == "train")["text"].to_list())
    assert not set(table["text"].to_list()) & train_texts
    assert leaked_id not in table["doc_id"].to_list()
    assert table.height == len(REGISTERS) * (SIZES["test"] + SIZES["validation"]) - 1


def test_seeded_sample_matches_an_independent_recomputation_and_is_stable(tmp_path):
    family = _family_table({"train": 3, "validation": 20, "test": 20})
    spec = _spec(_write_family(tmp_path, family), max_docs_per_label=6, sample_seed=3)
    table = read_corpus("debian", spec)
    unseen = family.filter(pl.col("split") != "train").with_columns(
        pl.col("split").replace_strict({"test": "heldout", "validation": "train"})
    )
    assert set(table["doc_id"].to_list()) == _expected_sample(unseen, 6, 3)
    assert table.group_by(["label", "split"]).len()["len"].to_list() == [6] * 6
    assert read_corpus("debian", spec).equals(table)
    # kept in the family's order
    order = {doc_id: i for i, doc_id in enumerate(family["doc_id"].to_list())}
    assert [order[i] for i in table["doc_id"].to_list()] == sorted(order[i] for i in table["doc_id"].to_list())
    other = read_corpus("debian", spec | {"sample_seed": 4})
    assert set(other["doc_id"].to_list()) != set(table["doc_id"].to_list())


def test_adding_documents_only_swaps_in_newcomers(tmp_path):
    small = _family_table({"train": 3, "validation": 10, "test": 10})
    large = _family_table({"train": 3, "validation": 25, "test": 25})
    kept = {}
    for name, family in (("small", small), ("large", large)):
        spec = _spec(_write_family(tmp_path / name, family), max_docs_per_label=4, sample_seed=0)
        kept[name] = set(read_corpus("debian", spec)["doc_id"].to_list())
    newcomers = set(large["doc_id"].to_list()) - set(small["doc_id"].to_list())
    assert kept["large"] <= kept["small"] | newcomers


def test_max_characters_cuts_at_a_sentence_end(tmp_path):
    family = _family_table()
    table = read_corpus("debian", _spec(_write_family(tmp_path, family), max_characters=80))
    source = dict(zip(family["doc_id"], family["text"], strict=True))
    for doc_id, text in zip(table["doc_id"], table["text"], strict=True):
        full = source[doc_id]
        first_sentence = full[: full.index(".") + 1]
        assert text == (full if len(full) <= 80 else first_sentence)
    assert any(len(text) < len(source[doc_id]) for doc_id, text in table.select("doc_id", "text").iter_rows())


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("Short one.", 40, "Short one."),
        ("First sentence here. Second one is long.", 30, "First sentence here."),
        ('He said "stop." Then he went on and on', 30, 'He said "stop."'),
        ("One. no sentence end for a long while here", 30, "One. no sentence end for a"),
        ("abcdefghijklmnopqrstuvwxyz", 10, "abcdefghij"),
    ],
)
def test_cut_text(text, limit, expected):
    assert cut_text(text, limit) == expected


def test_resolve_points_at_the_family_corpus():
    spec = {"format": "training", "family": "debian"}
    assert resolve_corpus_spec("debian", spec, {"family": "debian"})["path"] == (
        "results/training/debian/corpus.parquet"
    )
    jsonl = {"format": "jsonl", "path": "x.jsonl"}
    assert resolve_corpus_spec("registers", jsonl, None) == jsonl


@pytest.mark.parametrize(
    ("training", "message"),
    [
        (None, "training.family: debian"),
        ({}, "training.family: debian"),
        ({"family": "fineweb"}, "corpora.debian.family is 'debian' but training.family is 'fineweb'"),
    ],
)
def test_resolve_names_the_key_when_the_family_is_missing(training, message):
    with pytest.raises(CorpusError, match=message.replace(".", r"\.")):
        resolve_corpus_spec("debian", {"format": "training", "family": "debian"}, training)


def test_a_training_entry_names_no_path():
    with pytest.raises(CorpusError, match=r"remove corpora\.debian\.path"):
        resolve_corpus_spec("debian", {"format": "training", "family": "debian", "path": "x"}, {"family": "debian"})


def test_the_family_train_split_cannot_be_read(tmp_path):
    spec = _spec(_write_family(tmp_path, _family_table()), splits={"train": "train"})
    with pytest.raises(CorpusError, match="train split"):
        read_corpus("debian", spec)


def _config() -> dict:
    return load_yaml(REPO / "config" / "config.yaml")


def _validate(config: dict) -> None:
    validate_config(config, load_yaml(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def test_shipped_entry_is_valid_and_not_in_the_default_run():
    config = _config()
    _validate(config)
    assert config["corpora"]["debian"]["format"] == "training"
    assert config["corpora"]["debian"]["family"] == config["training"]["family"]
    assert "debian" not in config["run"]["corpora"]
    paper = load_yaml(REPO / "config" / "paper.yaml")
    assert paper["corpora"]["fineweb"]["family"] == paper["training"]["family"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"family": None}, "family"),
        ({"splits": {"train": "heldout"}}, "train"),
        ({"splits": {"test": "test"}}, "test"),
    ],
)
def test_schema_rejects_bad_training_entries(change, message):
    config = _config()
    entry = copy.deepcopy(config["corpora"]["debian"])
    for key, value in change.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    config["corpora"]["debian"] = entry
    with pytest.raises(ConfigError, match=message):
        _validate(config)
