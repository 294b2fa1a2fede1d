"""The training family: mixtures and members, tokenizer and packing, the resumable loop, saved members."""

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.config import check_training
from latent_atlas.errors import ConfigError
from latent_atlas.evaluation import evaluate_corpus
from latent_atlas.models import load_model
from latent_atlas.training.data import (
    END_OF_TEXT,
    load_streams,
    mixture_counts,
    pack_member,
    register_sequences,
    save_streams,
    tokenize_corpus,
    train_tokenizer,
)
from latent_atlas.training.evaluate import performance_matrix, scored_documents, specialisation
from latent_atlas.training.family import member_spec, members, mixtures
from latent_atlas.training.loop import (
    CHECKPOINT,
    Architecture,
    Optimiser,
    Recipe,
    build_model,
    learning_rate_factor,
    parse_recipe,
    train,
)
from latent_atlas.training.member import fingerprint, train_member

REGISTER_WORDS = {
    "recipes": [
        "stir",
        "the",
        "flour",
        "bake",
        "butter",
        "sugar",
        "oven",
        "minutes",
        "until",
        "golden",
        "mix",
        "bowl",
        "salt",
    ],
    "sagas": [
        "the",
        "king",
        "rode",
        "north",
        "with",
        "his",
        "sword",
        "and",
        "the",
        "ship",
        "sailed",
        "over",
        "cold",
        "sea",
    ],
}
SPLITS = ("train", "validation", "test")


def _document(register: str, rng: random.Random) -> str:
    words = REGISTER_WORDS[register]
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))) for _ in range(6)]
    sentences = [sentence.capitalize() + "." for sentence in sentences]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def register_corpus() -> pl.DataFrame:
    """Two registers with disjoint vocabularies, 40 documents each, split 30 / 5 / 5 by document."""
    rng = random.Random(0)
    rows = []
    for register in REGISTER_WORDS:
        for index in range(40):
            split = SPLITS[0] if index < 30 else SPLITS[1] if index < 35 else SPLITS[2]
            rows.append(
                {
                    "doc_id": f"{register}:{index}",
                    "text": _document(register, rng),
                    "label": register,
                    "split": split,
                    "source": "test",
                }
            )
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def family_tokenizer(register_corpus: pl.DataFrame):
    return train_tokenizer(iter(register_corpus.filter(pl.col("split") == "train")["text"].to_list()), 320)


def _training(**overrides) -> dict:
    training = {
        "family": "toy",
        "corpus": {"source": "debian", "sources": "x.yaml"},
        "registers": list(REGISTER_WORDS),
        "mixtures": {"single": True, "uniform": True, "leave_one_out": False},
        "tokenizer": {"vocab_size": 320},
        "architecture": {"hidden_size": 16, "layers": 2, "heads": 2, "intermediate_size": 32, "sequence_length": 16},
        "budget": {"tokens": 12 * 4 * 16, "batch_size": 4, "validation_sequences": 4},
        "optimiser": {"lr": 0.01, "warmup_fraction": 0.1},
        "seed": 3,
        "checkpoint_every": 4,
        "eval_every": 3,
    }
    return training | overrides


# ---- family and members ------------------------------------------------------------------------


def test_mixtures_cover_single_uniform_leave_one_out_and_custom():
    training = _training(
        registers=["a", "b", "c"],
        mixtures={"single": True, "uniform": True, "leave_one_out": True, "custom": {"heavy-a": {"a": 3, "b": 1}}},
    )
    found = {mixture.name: mixture.normalised() for mixture in mixtures(training)}
    assert list(found) == ["a", "b", "c", "uniform", "minus-a", "minus-b", "minus-c", "heavy-a"]
    assert found["uniform"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert found["minus-b"] == {"a": 0.5, "c": 0.5}
    assert found["heavy-a"] == {"a": 0.75, "b": 0.25}


def test_two_members_differ_only_in_data():
    config = {"training": _training(), "models": {}}
    narrative, uniform = member_spec(config, "toy-recipes"), member_spec(config, "toy-uniform")
    differing = {key for key in narrative if narrative[key] != uniform[key]}
    assert differing == {"name", "mixture", "data_hash"}
    assert narrative["recipe_hash"] == uniform["recipe_hash"]
    changed = member_spec({"training": _training(seed=4), "models": {}}, "toy-recipes")
    assert changed["recipe_hash"] != narrative["recipe_hash"] and changed["data_hash"] == narrative["data_hash"]


def test_family_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"custom\.odd weights \['z'\]"):
        mixtures(_training(mixtures={"single": False, "uniform": False, "custom": {"odd": {"z": 1}}}))
    with pytest.raises(ConfigError, match="selects no mixture"):
        mixtures(_training(mixtures={"single": False, "uniform": False}))
    with pytest.raises(ConfigError, match=r"rename training\.family"):
        members({"training": _training(), "models": {"toy-uniform": {}}})
    config = {"training": _training(evaluation={"pretrained": ["gpt9"]}), "run": {"models": ["m"]}, "models": {}}
    with pytest.raises(ConfigError, match=r"training\.evaluation\.pretrained' names 'gpt9'"):
        check_training(config)


# ---- tokenizer and packing ---------------------------------------------------------------------


def test_tokenizer_round_trips_any_text(family_tokenizer):
    text = "Stir the flour — naïve café, 42°C!\nThe king rode north."
    ids = family_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert family_tokenizer.decode(ids) == text
    assert len(family_tokenizer) == 320
    assert family_tokenizer.bos_token == family_tokenizer.eos_token == END_OF_TEXT


def test_streams_hold_every_document_after_one_separator(register_corpus, family_tokenizer, tmp_path):
    streams = tokenize_corpus(register_corpus, family_tokenizer, list(REGISTER_WORDS), SPLITS)
    save_streams(streams, tmp_path / "tokens.npz")
    loaded = load_streams(tmp_path / "tokens.npz")
    separator = family_tokenizer.bos_token_id
    for (split, register), stream in loaded.items():
        texts = register_corpus.filter((pl.col("split") == split) & (pl.col("label") == register))["text"]
        assert stream.n_documents == len(texts)
        for index, text in enumerate(texts):
            document = stream.document(index)
            assert document[0] == separator and separator not in document[1:]
            assert family_tokenizer.decode(document[1:].tolist()) == text


def test_mixture_counts_sum_and_follow_weights():
    counts = mixture_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 100)
    assert sum(counts.values()) == 100 and sorted(counts.values()) == [33, 33, 34]
    assert mixture_counts({"a": 0.75, "b": 0.25}, 8) == {"a": 6, "b": 2}


def test_members_read_prefixes_of_the_same_register_stream(register_corpus, family_tokenizer):
    streams = tokenize_corpus(register_corpus, family_tokenizer, list(REGISTER_WORDS), SPLITS)
    alone, epochs = register_sequences(streams[("train", "recipes")], 40, 16, seed=3, register="recipes")
    shared, _ = register_sequences(streams[("train", "recipes")], 20, 16, seed=3, register="recipes")
    np.testing.assert_array_equal(shared, alone[:20])
    per_epoch = len(streams[("train", "recipes")].ids) // 16
    assert epochs == math.ceil(40 / per_epoch)
    packed = pack_member(streams, {"recipes": 0.5, "sagas": 0.5}, 40, 6, 16, seed=3)
    assert packed.train.shape == (40, 16) and packed.train_sequences == {"recipes": 20, "sagas": 20}
    recipe_ids = set(family_tokenizer(" ".join(REGISTER_WORDS["recipes"]))["input_ids"])
    from_recipes = [row for row in packed.train if set(row.tolist()) & recipe_ids - {family_tokenizer.bos_token_id}]
    assert len(from_recipes) >= 20


# ---- the loop ------------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_decays_to_the_floor():
    recipe = parse_recipe(_training(budget={"tokens": 100 * 64, "batch_size": 4}, optimiser={"warmup_fraction": 0.1}))
    factors = [learning_rate_factor(step, recipe) for step in range(recipe.steps)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert learning_rate_factor(recipe.steps, recipe) == pytest.approx(recipe.optimiser.min_lr_ratio)


def _toy_run(tokenizer, checkpoints: Path, after_step=None, seed: int = 3):
    recipe = parse_recipe(_training(seed=seed))
    model = build_model(recipe.architecture, tokenizer, recipe.seed)
    rng = np.random.default_rng(0)
    data = rng.integers(0, len(tokenizer), size=(recipe.train_sequences, recipe.architecture.sequence_length))
    validation = rng.integers(0, len(tokenizer), size=(4, recipe.architecture.sequence_length))
    stamp = {"recipe_hash": f"r{seed}", "data_hash": "d"}
    return train(model, data, validation, recipe, checkpoints, stamp, progress=False, after_step=after_step)


class Killed(Exception):
    pass


def _kill_after(step: int):
    def hook(done: int) -> None:
        if done == step:
            raise Killed

    return hook


def test_a_killed_run_resumes_bit_identical(family_tokenizer, tmp_path):
    torch.set_num_threads(1)
    whole = _toy_run(family_tokenizer, tmp_path / "whole")
    with pytest.raises(Killed):
        _toy_run(family_tokenizer, tmp_path / "killed", after_step=_kill_after(6))
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["step"] == 4
    resumed = _toy_run(family_tokenizer, tmp_path / "killed")
    assert resumed.resumed_from == 4 and whole.resumed_from is None
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    columns = [c for c in whole.losses.columns if c != "seconds"]
    assert whole.losses.select(columns).equals(resumed.losses.select(columns))
    assert whole.final_validation_loss == resumed.final_validation_loss
    assert not list((tmp_path / "killed").glob(".*partial"))


def test_a_checkpoint_of_another_run_is_not_resumed(family_tokenizer, tmp_path):
    with pytest.raises(Killed):
        _toy_run(family_tokenizer, tmp_path, after_step=_kill_after(5))
    other = _toy_run(family_tokenizer, tmp_path, seed=4)
    assert other.resumed_from is None


def test_training_lowers_the_loss_on_learnable_data(family_tokenizer, tmp_path):
    recipe = Recipe(Architecture(16, 2, 2, 32, 16), Optimiser(lr=0.01), tokens=60 * 64, batch_size=4)
    pattern = np.tile(np.arange(5, 13), 2)
    data = np.stack([np.roll(pattern, -(i % 8)) for i in range(recipe.train_sequences)])
    model = build_model(recipe.architecture, family_tokenizer, 0)
    result = train(model, data, data[:4], recipe, tmp_path, {"recipe_hash": "x"}, progress=False)
    curve = result.losses.filter(pl.col("validation_loss").is_not_null())["validation_loss"]
    assert curve[-1] < curve[0] and curve[-1] < 0.15 * math.log(len(family_tokenizer))  # chance: ln V


def test_recipe_errors_name_the_key():
    with pytest.raises(ConfigError, match="less than one batch"):
        parse_recipe(_training(budget={"tokens": 10, "batch_size": 4}))
    with pytest.raises(ConfigError, match="multiple of heads"):
        Architecture(hidden_size=10, heads=4)
    with pytest.raises(ConfigError, match=r"optimiser\.min_lr_ratio"):
        Optimiser(min_lr_ratio=2.0)


# ---- a saved member ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_members(register_corpus, family_tokenizer, tmp_path_factory):
    """The two single-register members of the toy family, trained and saved."""
    root = tmp_path_factory.mktemp("family")
    family_tokenizer.save_pretrained(root / "tokenizer")
    save_streams(tokenize_corpus(register_corpus, family_tokenizer, list(REGISTER_WORDS), SPLITS), root / "tokens.npz")
    training = _training(budget={"tokens": 40 * 4 * 32, "batch_size": 4, "validation_sequences": 4})
    training["architecture"] = training["architecture"] | {"sequence_length": 32}
    config = {"training": training, "models": {}}
    saved = {}
    for name in ("toy-recipes", "toy-sagas"):
        spec = member_spec(config, name)
        train_member(
            spec,
            parse_recipe(training),
            root / "tokenizer",
            root / "tokens.npz",
            "corpus-sha",
            root / "models" / name,
            root / f"{name}.losses.parquet",
            root / "checkpoints" / name,
            device="cpu",
            progress=False,
        )
        saved[name] = root
    return root


def test_a_saved_member_loads_like_any_model(trained_members):
    loaded = load_model(trained_members / "models" / "toy-recipes", device="cpu")
    manifest = loaded.manifest
    assert manifest["source"] == "trained" and manifest["n_layers"] == 2 and manifest["d_model"] == 16
    record = manifest["training"]
    assert record["mixture"] == {"recipes": 1.0} and record["training_corpus_sha256"] == "corpus-sha"
    assert record["tokens_seen"] == 40 * 4 * 32 and record["tokens_per_register"] == {"recipes": 40 * 4 * 32}
    losses = pl.read_parquet(trained_members / "toy-recipes.losses.parquet")
    assert losses["step"].to_list() == list(range(1, 41))
    assert record["final_validation_loss"] == losses["validation_loss"].drop_nulls()[-1]
    meta = json.loads(pl.read_parquet_metadata(trained_members / "toy-recipes.losses.parquet")["latent_atlas"])
    assert meta["weights_sha256"] == manifest["weights_sha256"]
    assert fingerprint(member_spec({"training": _training(), "models": {}}, "toy-recipes"))["recipe_hash"]


def test_members_specialise_and_bits_per_byte_use_raw_bytes(trained_members, register_corpus):
    documents = scored_documents(register_corpus, list(REGISTER_WORDS), "test", None)
    tables = []
    for name in ("toy-recipes", "toy-sagas"):
        loaded = load_model(trained_members / "models" / name, device="cpu")
        tables.append(evaluate_corpus(loaded, documents, "test", 1024))
    matrix = performance_matrix(tables, {"toy-recipes": {"recipes": 1.0}, "toy-sagas": {"sagas": 1.0}})
    for row in matrix.iter_rows(named=True):
        texts = documents if row["register"] == "all" else documents.filter(pl.col("label") == row["register"])
        assert row["bytes"] == sum(len(text.encode("utf-8")) for text in texts["text"])
        assert row["bits_per_byte"] == pytest.approx(row["nll"] / (math.log(2) * row["bytes"]), rel=1e-12)
    checks = specialisation(matrix, {"toy-recipes": {"recipes": 1.0}, "toy-sagas": {"sagas": 1.0}})
    assert checks["register"].to_list() == ["recipes", "sagas"]
    assert checks["holds"].all(), checks


def test_test_documents_are_capped_stably_per_register(register_corpus):
    first = scored_documents(register_corpus, list(REGISTER_WORDS), "test", 3)
    again = scored_documents(register_corpus.reverse(), list(REGISTER_WORDS), "test", 3)
    assert first.group_by("label").len().sort("label")["len"].to_list() == [3, 3]
    assert sorted(first["doc_id"].to_list()) == sorted(again["doc_id"].to_list())
    with pytest.raises(ConfigError, match="no 'test' documents"):
        scored_documents(register_corpus, ["poetry"], "test", 3)


KILLABLE_RUN = """
import sys, time
import numpy as np, torch
from latent_atlas.training.data import train_tokenizer
from latent_atlas.training.loop import build_model, parse_recipe, train
torch.set_num_threads(1)
training = {training!r}
recipe = parse_recipe(training)
tokenizer = train_tokenizer(iter({texts!r}), 320)
model = build_model(recipe.architecture, tokenizer, recipe.seed)
rng = np.random.default_rng(0)
data = rng.integers(0, len(tokenizer), size=(recipe.train_sequences, recipe.architecture.sequence_length))
validation = rng.integers(0, len(tokenizer), size=(4, recipe.architecture.sequence_length))
slow = sys.argv[2] == "slow"
result = train(model, data, validation, recipe, sys.argv[1], {{"run": "kill"}}, progress=False,
               after_step=(lambda step: time.sleep(0.3)) if slow else None)
torch.save({{"state": result.model.state_dict(), "resumed_from": result.resumed_from}}, sys.argv[1] + "/final.pt")
"""


def test_a_sigkilled_training_process_resumes_bit_identical(register_corpus, tmp_path):
    """A real kill -9 mid-run: the rerun resumes from the last checkpoint and ends where an unkilled run ends."""
    import signal
    import subprocess
    import sys
    import time

    texts = register_corpus.filter(pl.col("split") == "train")["text"].to_list()
    script = tmp_path / "run.py"
    script.write_text(KILLABLE_RUN.format(training=_training(), texts=texts))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    subprocess.run([sys.executable, str(script), str(whole), "fast"], check=True, timeout=300)
    process = subprocess.Popen([sys.executable, str(script), str(killed), "slow"])
    deadline = time.monotonic() + 240
    while not (killed / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a step or two past the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and not (killed / "final.pt").exists()
    subprocess.run([sys.executable, str(script), str(killed), "fast"], check=True, timeout=300)
    expected, resumed = torch.load(whole / "final.pt"), torch.load(killed / "final.pt")
    assert expected["resumed_from"] is None and resumed["resumed_from"] in (4, 8)
    for name, tensor in expected["state"].items():
        assert torch.equal(tensor, resumed["state"][name]), name


def test_an_existing_models_tokenizer_can_be_the_familys(register_corpus):
    """training.tokenizer.model: streams separate documents with that tokenizer's BOS."""
    from latent_atlas.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    streams = tokenize_corpus(register_corpus, tokenizer, list(REGISTER_WORDS), SPLITS)
    sagas = streams[("test", "sagas")]
    assert sagas.n_documents == 5 and (sagas.ids[sagas.starts[:-1]] == tokenizer.bos_token_id).all()
    model = build_model(Architecture(16, 1, 2, 32, 16), tokenizer, seed=0)
    assert model.config.vocab_size == len(tokenizer) and model.config.bos_token_id == tokenizer.bos_token_id
