"""ITI (Li et al.): splits by item, probes fitted on train, heads ranked on validation, nothing read from test.

Expected values are computed here independently: the optimum of each probe by its first-order condition, the
mass-mean directions and stds with numpy, and the held-out test items replaced by garbage to show by
construction that they reach neither the probes nor the head choice.
"""

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.errors import ConfigError
from latent_atlas.steering.data import SPLITS, Statements, city_statements, load_statements, split_items
from latent_atlas.steering.vectors import fit_head_probes, iti_heads, top_heads
from tests.conftest import REPO

HARD_FACTS = REPO / "config/steering/hard_facts.csv"
CITIES = REPO / "config/steering/cities.csv"


# --- splits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [HARD_FACTS, CITIES])
def test_the_three_splits_are_disjoint_cover_every_item_and_follow_the_fractions(path):
    statements = load_statements(path, train_fraction=0.4, validation_fraction=0.2, seed=0)
    n = len(statements.prompts)
    parts = {name: set(statements.select(name).prompts) for name in SPLITS}
    assert set(statements.split) == set(SPLITS)
    assert parts["train"].isdisjoint(parts["validation"]) and parts["train"].isdisjoint(parts["test"])
    assert parts["validation"].isdisjoint(parts["test"])
    assert parts["train"] | parts["validation"] | parts["test"] == set(statements.prompts)
    assert sum(len(statements.select(name).prompts) for name in SPLITS) == n
    assert [len(parts[name]) for name in ("train", "validation")] == [round(0.4 * n), round(0.2 * n)]
    again = load_statements(path, train_fraction=0.4, validation_fraction=0.2, seed=0)
    assert (again.split == statements.split).all()  # deterministic
    other = load_statements(path, train_fraction=0.4, validation_fraction=0.2, seed=1)
    assert (other.split != statements.split).any()  # and seeded


def test_a_city_listed_twice_never_spans_two_splits(tmp_path):
    rows = [f"city{i % 10},country{i % 3}" for i in range(30)]  # every city three times
    (tmp_path / "facts.csv").write_text("city,country\n" + "\n".join(rows) + "\n")
    statements = city_statements(tmp_path / "facts.csv", 0.4, 0.2, seed=3)
    for city in {f"city{i}" for i in range(10)}:
        assert (
            len({s for p, s in zip(statements.prompts, statements.split, strict=True) if p.startswith(city + " ")}) == 1
        )
    assert [(statements.split == name).sum() for name in SPLITS] == [12, 6, 12]  # 4, 2, 4 cities, thrice each


def test_the_statements_of_a_split_are_its_items_true_then_false():
    statements = load_statements(HARD_FACTS, seed=0)
    test = statements.select("test")
    items = np.flatnonzero(statements.split == "test")
    assert test.prompts == [statements.prompts[i] for i in items]
    assert test.texts()[:2] == [
        f"{test.prompts[0]} {test.true_objects[0]}.",
        f"{test.prompts[0]} {test.false_objects[0]}.",
    ]
    assert test.labels().tolist() == [1.0, 0.0] * len(items)


@pytest.mark.parametrize(("train", "validation"), [(0.5, 0.5), (0.9, 0.2), (0.0, 0.2), (0.4, 0.0)])
def test_fractions_that_leave_no_test_split_are_refused(train, validation):
    with pytest.raises(ConfigError, match=r"steering\.iti\.train_fraction"):
        split_items([f"item{i}" for i in range(100)], train, validation, seed=0)


def test_too_few_items_for_three_splits_are_refused():
    with pytest.raises(ConfigError, match="leave a split empty"):
        split_items(["a", "b"], 0.4, 0.2, seed=0)


def test_a_fact_table_without_known_columns_is_refused(tmp_path):
    (tmp_path / "facts.csv").write_text("subject,object\nx,y\n")
    with pytest.raises(ConfigError, match="prompt,true,false"):
        load_statements(tmp_path / "facts.csv")


# --- the harder statement set --------------------------------------------------------------------------------


def test_the_hard_fact_set_is_licensed_large_enough_and_well_formed():
    header = HARD_FACTS.read_text().splitlines()[:4]
    assert any("CC0" in line for line in header) and all(line.startswith("#") for line in header)
    table = pl.read_csv(HARD_FACTS, comment_prefix="#")
    assert table.columns == ["category", "prompt", "true", "false"] and table.height >= 150
    assert table["prompt"].n_unique() == table.height  # one item per prompt
    assert (table["true"] != table["false"]).all() and table.null_count().sum_horizontal()[0] == 0
    assert (load_statements(HARD_FACTS).split == "test").sum() >= 40  # the default split's test items


# --- probes and head choice ----------------------------------------------------------------------------------


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 2, 3, 4)`` activations: head (0, 1) carries the label with noise, the others are noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2).float()
    activations = torch.randn(n, 2, 3, 4, generator=generator, dtype=torch.float64)
    activations[:, 0, 1, 2] += 1.5 * (2 * labels - 1)
    return activations, labels


def test_each_probe_is_the_regularised_logistic_optimum_and_scores_like_its_own_rule():
    activations, labels = _synthetic(60, seed=0)
    weight_decay = 0.05
    probes = fit_head_probes(activations, labels, weight_decay=weight_decay, steps=200)
    x = activations.numpy()
    standard = (x - x.mean(0)) / x.std(0, ddof=1)  # the probes' standardisation, recomputed
    y = labels.numpy()
    for layer in range(2):
        for head in range(3):
            w, b = probes.weights[layer, head].numpy(), float(probes.bias[layer, head])
            features = standard[:, layer, head]
            residual = 1 / (1 + np.exp(-(features @ w + b))) - y
            # ∇ of mean log-loss + λ/2‖w‖² is zero at the (unique, convex) optimum
            np.testing.assert_allclose(features.T @ residual / len(y) + weight_decay * w, 0, atol=1e-6)
            assert abs(residual.mean()) < 1e-6
    held_out, held_labels = _synthetic(40, seed=1)
    z = (held_out.numpy() - x.mean(0)) / x.std(0, ddof=1)
    logits = np.einsum("nlhf,lhf->nlh", z, probes.weights.numpy()) + probes.bias.numpy()
    expected = ((logits > 0) == held_labels.numpy()[:, None, None].astype(bool)).mean(0)
    np.testing.assert_allclose(probes.accuracy(held_out, held_labels).numpy(), expected, atol=1e-7)


def test_heads_are_ranked_on_validation_not_on_the_rows_the_probes_were_fitted_on():
    generator = torch.Generator().manual_seed(0)
    n = 200
    labels = (torch.arange(n) % 2).float()
    activations = torch.randn(n, 1, 2, 4, generator=generator)
    train, validation = torch.arange(n) < 100, torch.arange(n) >= 100
    # head 0 is a perfect but spurious feature on the training rows only; head 1 a noisy real one everywhere
    activations[train, 0, 0, 0] += 5 * (2 * labels[train] - 1)
    activations[:, 0, 1, 0] += 1.5 * (2 * labels - 1)
    probes = fit_head_probes(activations[train], labels[train])
    on_train = probes.accuracy(activations[train], labels[train])
    on_validation = probes.accuracy(activations[validation], labels[validation])
    assert top_heads(on_train, 1) == [(0, 0)] and top_heads(on_validation, 1) == [(0, 1)]
    assert top_heads(torch.tensor([[0.5, 0.7, 0.7], [0.9, 0.1, 0.7]]), 3) == [(1, 0), (0, 1), (0, 2)]  # stable ties


def test_mass_mean_directions_and_stds_match_a_numpy_recomputation():
    activations, labels = _synthetic(50, seed=2)
    heads = iti_heads(activations, labels, [(0, 1), (1, 2)])
    x, y = activations.numpy(), labels.numpy()
    for found, (layer, head) in zip(heads, [(0, 1), (1, 2)], strict=True):
        values = x[:, layer, head]
        theta = values[y == 1].mean(0) - values[y == 0].mean(0)
        theta /= np.linalg.norm(theta)
        assert (found.layer, found.head) == (layer + 1, head)  # blocks are numbered from 1
        np.testing.assert_allclose(found.direction.numpy(), theta, atol=1e-6)
        assert found.std == pytest.approx(float((values @ theta).std(ddof=1)), rel=1e-6)


# --- no test item reaches the choice (by construction) -----------------------------------------------------


@pytest.fixture(scope="module")
def iti_setup(tiny_model_dirs, tmp_path_factory):
    from latent_atlas.extract import ExtractionSettings, extract_activations
    from latent_atlas.models import load_model
    from latent_atlas.steering.data import load_steering_data
    from tests.conftest import STORE_ATTRS
    from tests.unit.test_lenses import _random_corpus
    from tests.unit.test_steering import STEERING_DATA

    root = tmp_path_factory.mktemp("iti")
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    extract_activations(loaded, _random_corpus(30), root / "s.h5", ExtractionSettings(device="cpu"), STORE_ATTRS, False)
    (root / "data.yaml").write_text(STEERING_DATA)
    words = ["dog", "cat", "house", "river", "city", "world", "water", "light", "day", "night", "time", "way"]
    turn = [words[k:] + words[:k] for k in range(len(words))]  # the words rotated by k
    rows = [f"the {a} of the {b} is,{c},{d}" for a, b, c, d in zip(words, turn[3], turn[5], turn[7], strict=True)]
    rows += [f"a {a} and the {b} was,{c},{d}" for a, b, c, d in zip(words, turn[1], turn[2], turn[9], strict=True)]
    (root / "facts.csv").write_text("# CC0\nprompt,true,false\n" + "\n".join(rows) + "\n")
    return loaded, root, load_steering_data(root / "data.yaml")


def _garbage_test_items(statements: Statements) -> Statements:
    """The same statements with every test item's prompt and objects replaced by other words."""
    rng = np.random.default_rng(7)
    vocabulary = ["people", "sound", "blue", "old", "new", "made", "came", "said", "two", "three", "small", "red"]
    garble = {i for i in np.flatnonzero(statements.split == "test")}

    def noise(length: int) -> str:
        return " ".join(rng.choice(vocabulary, length))

    return dataclasses.replace(
        statements,
        prompts=[noise(9) if i in garble else p for i, p in enumerate(statements.prompts)],
        true_objects=[noise(3) if i in garble else o for i, o in enumerate(statements.true_objects)],
        false_objects=[noise(1) if i in garble else o for i, o in enumerate(statements.false_objects)],
    )


def test_garbage_test_items_leave_probes_heads_and_directions_unchanged_bit_for_bit(iti_setup):
    from latent_atlas.steering.pipeline import select_iti_heads

    loaded, root, _ = iti_setup
    statements = load_statements(root / "facts.csv", 0.4, 0.2, seed=0)
    garbled = _garbage_test_items(statements)
    assert garbled.select("test").texts() != statements.select("test").texts()
    assert garbled.select("train").texts() == statements.select("train").texts()
    clean, dirty = (select_iti_heads(loaded, s, k=3, seed=0) for s in (statements, garbled))
    assert [(h.layer, h.head, h.std) for h in clean.heads] == [(h.layer, h.head, h.std) for h in dirty.heads]
    for a, b in zip(clean.heads, dirty.heads, strict=True):
        assert torch.equal(a.direction, b.direction)
    for field in ("mean", "std", "weights", "bias", "shuffled_weights", "shuffled_bias"):
        assert torch.equal(getattr(clean.probes, field), getattr(dirty.probes, field)), field
    assert torch.equal(clean.validation_accuracy, dirty.validation_accuracy)
    assert clean.statements == {"train": 20, "validation": 10}  # 10 and 5 of the 24 items, twice each


def test_run_iti_reports_on_the_test_split_only(iti_setup):
    from latent_atlas.steering.pipeline import run_iti
    from latent_atlas.store import ActivationStore

    loaded, root, data = iti_setup
    statements = load_statements(root / "facts.csv", 0.4, 0.2, seed=0)
    section = {"iti": {"strengths": [0, 8], "heads": 3}}
    with ActivationStore(root / "s.h5") as store:
        table, probes = run_iti(loaded, statements, data, section, store)
        garbled_table, garbled_probes = run_iti(loaded, _garbage_test_items(statements), data, section, store)
    chosen = ["layer", "head", "validation_accuracy", "shuffled_validation_accuracy", "validation_rank", "selected"]
    assert probes.select(chosen).equals(garbled_probes.select(chosen))  # the choice ignores the test items
    assert not probes["test_accuracy"].equals(garbled_probes["test_accuracy"])  # what is reported reads them
    assert probes["selected"].sum() == 3 and sorted(probes.filter("selected")["validation_rank"]) == [1, 2, 3]
    assert set(probes["test_statements"]) == {18} and set(probes["validation_statements"]) == {10}
    assert set(table["test_items"]) == {9} and {"test_truth_accuracy", "test_mean_log_prob_margin"} <= set(
        table.columns
    )
    assert table.filter(pl.col("coefficient") == 0)["off_target_kl"][0] < 1e-6
    assert not table["test_mean_log_prob_margin"].equals(garbled_table["test_mean_log_prob_margin"])


def _probe_rows(correct: list[list[bool]], shuffled: list[list[bool]]) -> pl.DataFrame:
    heads = len(correct)
    return pl.DataFrame(
        {"layer": [1] * heads, "head": list(range(heads)), "selected": [True] * heads,
         "validation_rank": list(range(1, heads + 1)), "test_accuracy": [float(np.mean(c)) for c in correct],
         "shuffled_test_accuracy": [float(np.mean(c)) for c in shuffled], "test_statements": [len(correct[0])] * heads,
         "test_correct": correct, "shuffled_test_correct": shuffled},
        schema_overrides={"test_correct": pl.List(pl.Boolean), "shuffled_test_correct": pl.List(pl.Boolean)},
    )  # fmt: skip


def test_probe_accuracy_intervals_resample_test_items_with_both_statements():
    from latent_atlas.stats import bootstrap_mean
    from latent_atlas.steering.summary import ITEM, iti_probe_intervals

    rng = np.random.default_rng(5)
    items = rng.random(30) < 0.7  # 30 items: both statements right (70 %) or both wrong
    paired = np.repeat(items, 2).tolist()
    noisy = (rng.random(60) < 0.5).tolist()
    probes = iti_probe_intervals(_probe_rows([paired, [True] * 60], [noisy, noisy]), replicates=2000, seed=3)
    first = probes.row(0, named=True)
    # an item's two statements always agree here, so resampling items is the bootstrap of the 30 item values
    expected = bootstrap_mean(items.astype(float), unit=ITEM, replicates=2000, seed=3)
    assert (first["ci_low"], first["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert first["test_accuracy"] == pytest.approx(items.mean())
    assert first["ci_low"] < first["test_accuracy"] < first["ci_high"]
    assert (first["n"], first["unit"]) == (30, ITEM)
    # and it is wider than a bootstrap that took the 60 statements as independent
    statements = bootstrap_mean(np.repeat(items, 2).astype(float), unit="statement", replicates=2000, seed=3)
    assert first["ci_high"] - first["ci_low"] > 1.2 * (statements.high - statements.low)
    control = bootstrap_mean(np.asarray(noisy, float), np.arange(60) // 2, unit=ITEM, replicates=2000, seed=3)
    assert (first["shuffled_ci_low"], first["shuffled_ci_high"]) == pytest.approx((control.low, control.high))
    always = probes.row(1, named=True)
    assert (always["ci_low"], always["ci_high"]) == (1.0, 1.0)  # a head right on every item has no spread


def test_a_probe_table_without_per_statement_rows_gets_nan_bounds():
    from latent_atlas.steering.summary import iti_probe_intervals

    probes = _probe_rows([[True, False] * 5], [[True, True] * 5]).drop("test_correct", "shuffled_test_correct")
    row = iti_probe_intervals(probes).row(0, named=True)
    assert np.isnan(row["ci_low"]) and np.isnan(row["shuffled_ci_high"]) and row["n"] == 5


def test_run_iti_keeps_each_heads_test_correctness_and_its_interval(iti_setup):
    from latent_atlas.steering.pipeline import run_iti
    from latent_atlas.store import ActivationStore

    loaded, root, data = iti_setup
    statements = load_statements(root / "facts.csv", 0.4, 0.2, seed=0)
    with ActivationStore(root / "s.h5") as store:
        _, probes = run_iti(loaded, statements, data, {"iti": {"strengths": [0], "heads": 3}}, store)
    for row in probes.iter_rows(named=True):
        assert len(row["test_correct"]) == len(row["shuffled_test_correct"]) == row["test_statements"] == 18
        assert np.mean(row["test_correct"]) == pytest.approx(row["test_accuracy"])
        assert np.mean(row["shuffled_test_correct"]) == pytest.approx(row["shuffled_test_accuracy"])
        assert (row["n"], row["unit"]) == (9, "statement item")
        assert row["ci_low"] <= row["test_accuracy"] <= row["ci_high"]
        assert row["shuffled_ci_low"] <= row["shuffled_test_accuracy"] <= row["shuffled_ci_high"]
