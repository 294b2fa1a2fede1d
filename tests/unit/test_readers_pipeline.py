"""The readers' jobs on a tiny model and its store: what they read, the one split, the ELM's controls and paths."""

import copy

import h5py
import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.config import check_references
from latent_atlas.errors import ConfigError, StoreError
from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.models import load_model
from latent_atlas.readers import baselines, elm
from latent_atlas.readers.clustering import label_token_ids
from latent_atlas.readers.data import document_vectors, labelled_split, templated_split
from latent_atlas.readers.pipeline import (
    compare_readers,
    elm_data,
    evaluate_elm,
    named_label,
    sign_test,
    summarise_controls,
    task_split,
    train_elm,
)
from latent_atlas.readers.settings import ComparisonSettings, ElmSettings, Task
from latent_atlas.store import ActivationStore
from tests.conftest import STORE_ATTRS

WORDS = ("the", "a", "dog", "cat", "house", "river", "city", "old", "new", "small", "large", "red", "blue", "green")
LABEL_WORDS = {"animal": " dog", "place": " city"}
MAX_TOKENS = 6


def _corpus(n_per_label: int = 8) -> pl.DataFrame:
    """Two labels of random word sequences (animals and places), a quarter of each held out."""
    rng = np.random.default_rng(0)
    rows = []
    for label, topic in (("animal", ("dog", "cat")), ("place", ("house", "river", "city"))):
        for i in range(n_per_label):
            words = [*rng.choice(WORDS, size=int(rng.integers(3, 10))), *rng.choice(topic, size=3)]
            split = "heldout" if i % 4 == 3 else "train"
            rows.append({"doc_id": f"{label}-{i}", "text": " ".join(words), "label": label, "split": split})
    return pl.DataFrame(rows).with_columns(source=pl.lit("test"))


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    torch.manual_seed(0)
    return load_model(tiny_model_dirs["llama"], device="cpu")


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def store_path(loaded, corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("readers") / "store.h5"
    settings = ExtractionSettings(dtype="float32", device="cpu")
    return extract_activations(loaded, corpus, path, settings, STORE_ATTRS, progress=False)


def test_the_last_state_read_is_what_the_model_computes_for_the_truncated_text(loaded, corpus, store_path):
    with ActivationStore(store_path) as store:
        vectors = document_vectors(store, "ln_final", MAX_TOKENS, "last")
        means = document_vectors(store, "resid.02", MAX_TOKENS, "mean")
    for doc_id, vector, mean in zip(vectors.doc_ids[:4], vectors.vectors[:4], means.vectors[:4], strict=True):
        text = corpus.filter(pl.col("doc_id") == doc_id)["text"][0]
        ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][:, :MAX_TOKENS]
        with torch.no_grad():
            hidden = loaded.model(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(vector, hidden[-1][0, -1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mean, hidden[2][0].mean(0), rtol=1e-4, atol=1e-5)


def test_a_store_with_a_fraction_of_the_tokens_is_refused(store_path, tmp_path):
    copy_path = tmp_path / "fraction.h5"
    copy_path.write_bytes(store_path.read_bytes())
    with h5py.File(copy_path, "r+") as handle:
        handle.attrs["extraction"] = '{"token_fraction": 0.5}'
    with ActivationStore(copy_path) as store, pytest.raises(StoreError, match=r"extraction\.token_fraction: 1\.0"):
        document_vectors(store, "ln_final", MAX_TOKENS, "last")


def test_a_label_without_a_word_names_the_key(store_path):
    with ActivationStore(store_path) as store:
        vectors = document_vectors(store, "ln_final", MAX_TOKENS, "last")
    message = r"readers\.tasks\.topics\.label_words has no word for the label\(s\) \['place'\]"
    with pytest.raises(ConfigError, match=message):
        labelled_split(vectors, {"animal": " dog"}, "topics")


CLUSTERING = {
    "seeds": [0, 1],
    "variants": ["all_bases", "gt_only"],
    "reduction": 4,
    "epochs": 3,
    "batch_size": 4,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "temperature": 0.05,
    "knn_k": 3,
    "probe_weight_decay": 1e-3,
    "shots_per_class": 1,
    "separator": "\n\n",
    "batch_size_icl": 3,
}
TASK = {"corpus": "topics", "label_words": LABEL_WORDS, "template": "{text} . it is a{label}"}
TOPICS = Task.from_config("topics", TASK)


LORA = {"enabled": True, "rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0,
        "lr": 1e-2, "weight_decay": 0.0, "steps": 2, "batch_size": 4, "seeds": None}  # fmt: skip


def _comparison(lora: dict) -> ComparisonSettings:
    """A compare_readers job's settings on the topics task."""
    return ComparisonSettings.from_config("topics", task=TASK, clustering=CLUSTERING, lora=lora, max_tokens=MAX_TOKENS)


def test_every_method_is_scored_on_the_same_split_and_each_state_reader_on_both_inputs(loaded, corpus, store_path):
    with ActivationStore(store_path) as store:
        table = compare_readers(loaded, store, corpus, _comparison(LORA))
        split = task_split(store, TOPICS, MAX_TOKENS)
    assert table["split_hash"].unique().to_list() == [split.split_hash]
    assert set(table["n_test"]) == {len(split.test_ids)} == {corpus.filter(pl.col("split") == "heldout").height}
    readers = {"semantic_bases", "knn_prompting", "linear_probe", "zero_shot"}
    clustering = {"clustering_all_bases", "clustering_gt_only"}
    expected = {(m, i) for m in readers | clustering for i in ("raw", "template")}
    expected |= {("in_context", "template"), ("lora", "template")}
    assert set(zip(table["method"], table["input"], strict=True)) == expected
    for (method, read), rows in table.group_by("method", "input"):
        seeded = method in clustering | {"in_context", "lora"}
        assert sorted(rows["seed"].to_list(), key=str) == ([0, 1] if seeded else [None]), (method, read)
    assert table["balanced_accuracy"].is_between(0, 1).all() and table["macro_f1"].is_between(0, 1).all()
    with ActivationStore(store_path) as store:
        without = compare_readers(loaded, store, corpus, _comparison({**LORA, "enabled": False}))
    assert "lora" not in set(without["method"])


def _template_prompt(tokenizer, text: str) -> list[int]:
    """The text cut to MAX_TOKENS tokens, rendered by TASK's template with an empty label (built here)."""
    cut = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS])
    return tokenizer(TASK["template"].format(text=cut, label=""))["input_ids"]


def test_the_template_state_is_the_models_final_hidden_state_at_the_answer_position(loaded, corpus, store_path):
    with ActivationStore(store_path) as store:
        raw = task_split(store, TOPICS, MAX_TOKENS)
    template = templated_split(loaded, corpus, raw, TASK["template"], MAX_TOKENS, batch_size=3)
    assert (template.train_ids, template.test_ids) == (raw.train_ids, raw.test_ids)
    assert torch.equal(template.train_y, raw.train_y) and torch.equal(template.test_y, raw.test_y)
    texts = dict(zip(corpus["doc_id"], corpus["text"], strict=True))
    for ids, states in ((raw.train_ids, template.train_x), (raw.test_ids, template.test_x)):
        for doc_id, state in zip(ids, states, strict=True):
            prompt = torch.tensor([_template_prompt(loaded.tokenizer, texts[doc_id])])
            with torch.no_grad():
                expected = loaded.model(prompt, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(state, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(template.test_x, raw.test_x)  # the template moved the read position


def test_zero_shot_on_template_states_is_zero_shot_prompting(loaded, corpus, store_path):
    with ActivationStore(store_path) as store:
        raw = task_split(store, TOPICS, MAX_TOKENS)
    template = templated_split(loaded, corpus, raw, TASK["template"], MAX_TOKENS)
    ids = label_token_ids(loaded.tokenizer, LABEL_WORDS, "topics")
    head = loaded.parts.lm_head.weight.detach()
    from_states = baselines.zero_shot_from_states(template.test_x, head, ids)
    texts = dict(zip(corpus["doc_id"], corpus["text"], strict=True))
    words = [LABEL_WORDS[label] for label in raw.labels]
    prompted, _ = baselines.icl_predict(
        loaded.model, loaded.tokenizer, [], [texts[d] for d in raw.test_ids], words, TASK["template"],
        max_tokens=MAX_TOKENS, batch_size=2,
    )  # fmt: skip
    assert from_states.tolist() == prompted.tolist()


def test_sign_test_matches_the_binomial_tails():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)  # all ten one way: 2 * 0.5**10
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test(2, 8) == sign_test(8, 2)


def test_named_label_takes_the_longest_word_that_opens_the_text():
    words = {"narrative": " story", "short": " story of", "poem": " poem"}
    assert named_label(" Story of a life", words) == "short"
    assert named_label(" story, told", words) == "narrative"
    assert named_label("\n poem.", words) == "poem"
    assert named_label(" recipe", words) is None


ELM = {
    "enabled": True,
    "task": "topics",
    "layer": 2,
    "pooling": "mean",
    "soft_tokens": 1,
    "hidden_size": 32,
    "target_tokens": 4,
    "prompts": {"reconstruction": "a <embedding> . the", "register": "a <embedding> . it is a"},
    "stage": 1,
    "lm_lr": 1e-5,
    "steps": 4,
    "batch_size": 4,
    "lr": 1e-2,
    "eval_every": 2,
    "seed": 0,
    "max_new_tokens": 3,
    "examples": 2,
    "judge": None,
    "judge_layer": None,
    "path": {"from": "animal", "to": "place", "steps": 3, "scales": [0.0, 1.0]},
}
ELM_SETTINGS = ElmSettings.from_config({"elm": ELM, "task": TASK, "max_tokens": MAX_TOKENS})


@pytest.fixture(scope="module")
def trained(loaded, corpus, store_path):
    with ActivationStore(store_path) as store:
        data = elm_data(loaded.tokenizer, store, corpus, ELM_SETTINGS)
    adapter, losses = train_elm(loaded, data, ELM_SETTINGS)
    return data, adapter, losses


def test_elm_examples_cover_both_tasks_and_only_their_split(trained):
    data, _, losses = trained
    train_rows, heldout_rows = set(data.rows("train")), set(data.rows("heldout"))
    assert {e.embedding_index for e in data.train} == train_rows
    assert {e.embedding_index for e in data.heldout} == heldout_rows
    assert len(data.train) == 2 * len(train_rows) and len(data.heldout) == 2 * len(heldout_rows)
    registers = [e for e in data.heldout if "it is a" in e.prompt]
    assert {e.target for e in registers} == set(LABEL_WORDS.values())
    assert losses["step"].to_list() == [0, 1, 2, 3, 4] and losses["heldout_loss"].is_not_null().sum() == 3


def test_elm_evaluation_pairs_each_passage_with_its_controls(loaded, trained):
    data, adapter, _ = trained
    frozen = copy.deepcopy(loaded.model.state_dict())
    scores, paths = evaluate_elm(loaded, adapter, data, ELM_SETTINGS)
    heldout = [data.points.doc_ids[i] for i in data.rows("heldout")]
    assert scores.height == 3 * len(heldout)
    true, shuffled, none = (scores.filter(pl.col("condition") == c) for c in ("true", "shuffled", "none"))
    assert true["embedding_of"].to_list() == true["doc_id"].to_list() == heldout
    assert (shuffled["embedding_of"] != shuffled["doc_id"]).all()
    assert none["embedding_of"].null_count() == none.height and none["reconstruction_generated"].n_unique() == 1
    # the no-embedding generation reads the prompt as the `none` losses do: its pieces, the placeholder dropped
    unplaced = elm.generate(loaded, None, None, ELM["prompts"]["reconstruction"], ELM["max_new_tokens"])
    assert none["reconstruction_generated"][0] == unplaced[0]
    assert scores["consistency"].null_count() == scores.height  # no judge configured
    # the losses are the adapter's own: recomputed directly for the true condition
    examples = [e for e in data.heldout if e.prompt == ELM["prompts"]["reconstruction"]]
    direct = elm.target_losses(loaded, adapter, data.points.vectors, examples, "true", ELM["seed"])
    np.testing.assert_allclose(true["reconstruction_nll"].to_numpy(), direct.numpy(), rtol=1e-5)
    # paths: the interpolation starts at the first held-out animal, whose own description it repeats
    assert paths["kind"].to_list() == ["interpolation"] * 3 + ["direction"] * 2
    start = paths.row(0, named=True)
    assert start["from_doc"] == min(d for d in heldout if d.startswith("animal"))
    own = true.filter(pl.col("doc_id") == start["from_doc"])["reconstruction_generated"][0]
    assert start["reconstruction_generated"] == own
    assert paths.filter(pl.col("kind") == "direction")["reconstruction_generated"][0] == own  # scale 0
    assert all(torch.equal(frozen[k], v) for k, v in loaded.model.state_dict().items())
    summary = summarise_controls(scores)
    assert summary["condition"].to_list() == ["true", "shuffled", "none"]


def test_readers_config_references_are_checked():
    base = {
        "run": {"models": ["m"], "corpora": ["c"]},
        "models": {"m": {}, "judge": {}},
        "corpora": {"c": {}},
        "readers": {"tasks": {"t": {"corpus": "c", "label_words": {"a": " a", "b": " b"}}}, "elm": {"task": "t"}},
    }
    check_references(base)
    cases = [
        (("readers", "tasks", "t", "corpus"), "nope", "readers.tasks.t.corpus' names 'nope'"),
        (("readers", "elm", "task"), "u", "readers.elm.task' names 'u'"),
        (("readers", "elm", "judge"), ["m", "x"], "readers.elm.judge' names 'x'"),
        (("readers", "elm", "path"), {"from": "z"}, "readers.elm.path.from' is 'z'"),
        (("readers", "models"), ["judge"], "readers.models' names 'judge', which is not in run.models"),
    ]
    for keys, value, message in cases:
        config = copy.deepcopy(base)
        node = config
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            check_references(config)
