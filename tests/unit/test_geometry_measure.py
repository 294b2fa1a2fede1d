"""Geometry of a store: streamed statistics equal in-memory ones, and the measured metrics see what was planted."""

import numpy as np
import polars as pl
import pytest
from IsoScore.IsoScore import IsoScore as reference_isoscore

from latent_atlas.errors import ConfigError, StoreError
from latent_atlas.geometry.measure import (
    GeometrySettings,
    TokenTable,
    measure_geometry,
    probe_accuracy,
    register_auc,
    roc_auc,
    token_table,
    whole_document_sample,
)
from latent_atlas.geometry.metrics import (
    AFFINE_POST_PROCESSINGS,
    MomentAccumulator,
    Moments,
    fit_post_processing,
    isoscore,
    post_processing_from_moments,
    twonn,
)
from latent_atlas.store import ActivationStore, StoreWriter
from latent_atlas.testing import tiny_tokenizer
from tests.conftest import STORE_ATTRS

RNG = np.random.default_rng(3)
D, DOC_LENGTH, N_DOCS = 16, 30, 48
REGISTERS = ("news", "poem", "recipe", "chat")
FAST = {"pairs": 800, "twonn_states": 600, "words": 20, "flow": {"epochs": 2, "hidden": 8}}


def _write_store(path, poison: bool = False, massive: tuple[int, ...] = ()) -> np.ndarray:
    """A store at resid.01/.02 where register, position and one rogue dimension are planted; returns resid.01.

    ``massive`` rows get states 100 times longer (massive activations, Sun et al. 2024) at both layers.
    """
    tokenizer = tiny_tokenizer()
    vocabulary = tokenizer.convert_tokens_to_ids(["the", "dog", "cat", "river", "city", "old", "new", "red"])
    full_stop = tokenizer.convert_tokens_to_ids(".")
    n = N_DOCS * DOC_LENGTH
    doc = np.repeat(np.arange(N_DOCS), DOC_LENGTH)
    pos = np.tile(np.arange(DOC_LENGTH), N_DOCS)
    token_ids = RNG.choice(vocabulary, n)
    token_ids[pos % 10 == 9] = full_stop  # three sentences per document
    register = doc % len(REGISTERS)
    states = RNG.standard_normal((n, D))
    states[:, 0] += 8.0  # a rogue dimension shared by every state
    states[np.arange(n), 4 + register] += 3.0  # each register has its own direction
    states[:, 2] += 3.0 * np.log1p(pos)  # so is position
    states[pos == 0] *= 50.0  # the attention sink
    states[list(massive)] *= 100.0
    if poison:
        states[5, 3] = np.inf
    docs = pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(N_DOCS)],
            "label": [REGISTERS[i % len(REGISTERS)] for i in range(N_DOCS)],
            "split": ["heldout" if (i // len(REGISTERS)) % 3 == 0 else "train" for i in range(N_DOCS)],
            "token_start": np.arange(N_DOCS) * DOC_LENGTH,
            "token_count": [DOC_LENGTH] * N_DOCS,
        }
    )
    attrs = {**STORE_ATTRS, "model_sha256": "f" * 64, "code_version": "v", "n_layers": 2, "created": "now"}
    with StoreWriter(path, n, D, [1, 2], "float32", attrs) as writer:
        writer.write_tokens(token_ids, doc, pos)
        writer.write_docs(docs)
        writer.write_states("resid.01", 0, states.astype(np.float32))
        writer.write_states("resid.02", 0, (states @ RNG.standard_normal((D, D))).astype(np.float32))
        writer.write_states("ln_final", 0, states.astype(np.float32))
    return states


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("geometry") / "store.h5"
    _write_store(path)
    return path


@pytest.fixture(scope="module")
def measured(store_path):
    with ActivationStore(store_path) as store:
        return measure_geometry(store, tiny_tokenizer(), GeometrySettings.from_config({"layers": [1, 2], **FAST}))


def _value(table: pl.DataFrame, metric: str, processing: str = "none", register: str = "all", layer: int = 1) -> float:
    row = table.filter(
        (pl.col("metric") == metric) & (pl.col("processing") == processing) & (pl.col("register") == register)
        & (pl.col("layer") == layer)
    )  # fmt: skip
    assert row.height == 1, (metric, processing, register, layer)
    return float(row["value"][0])


# ---- statistics --------------------------------------------------------------------------------------


def test_streamed_moments_equal_in_memory_moments_despite_a_large_offset():
    states = RNG.standard_normal((1000, 8)) * 0.01 + 1e4  # catastrophic cancellation for a naive Σx² − n·μ²
    accumulator = MomentAccumulator(8)
    for block in np.array_split(states, [1, 7, 300, 301, 999]):
        accumulator.add(block)
    streamed, exact = accumulator.moments(), Moments.of(states)
    assert streamed.count == 1000
    np.testing.assert_allclose(streamed.mean, exact.mean, rtol=1e-14)
    np.testing.assert_allclose(streamed.covariance, np.cov(states, rowvar=False), rtol=1e-9, atol=1e-12)
    for name in AFFINE_POST_PROCESSINGS:
        from_moments = post_processing_from_moments(streamed, name)(states)
        np.testing.assert_allclose(from_moments, fit_post_processing(states, name)(states), rtol=1e-6, atol=1e-8)


def test_isoscore_agrees_with_the_reference_package():
    """Rudman et al.'s own implementation (PyPI isoscore 2.0.1, points as rows) on isotropic and skewed data."""
    for scales in (np.ones(12), np.geomspace(1, 100, 12), np.r_[np.ones(3), np.zeros(9) + 1e-3]):
        points = RNG.standard_normal((3000, 12)) * scales @ np.linalg.qr(RNG.standard_normal((12, 12)))[0]
        # the reference takes √n of an integer tensor, in float32: agreement to float32 precision
        assert isoscore(points) == pytest.approx(float(reference_isoscore(points)), abs=1e-6)


def test_blocked_twonn_equals_the_definition():
    points = RNG.standard_normal((300, 5))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, :2]
    mu = np.sort(nearest[:, 1] / nearest[:, 0])
    keep = int(0.9 * len(mu))
    x, y = np.log(mu[:keep]), -np.log(1 - np.arange(1, keep + 1) / len(mu))
    assert twonn(points, block=7) == pytest.approx((x @ y) / (x @ x), rel=1e-12)


def test_roc_auc_counts_every_pair_with_ties_halved():
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.4])
    positive = np.array([False, True, False, True, False, True])
    pairs = [(p, q) for p in scores[positive] for q in scores[~positive]]
    expected = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs])
    assert roc_auc(scores, positive) == pytest.approx(expected)
    clusters = np.repeat(np.eye(3), 5, axis=0) + 0.01 * RNG.standard_normal((15, 3))
    assert register_auc(clusters, np.repeat(np.arange(3), 5)) == pytest.approx(1.0)


def test_logistic_probe_reads_a_planted_label_and_a_shuffled_one_sits_at_chance():
    labels = RNG.integers(0, 4, 2000)
    features = RNG.standard_normal((2000, 10))
    features[:, 3] += 5.0 * labels  # ordinal, 5σ apart: Bayes accuracy ≈ 0.98
    train, test = slice(0, 1500), slice(1500, None)
    assert probe_accuracy(features[train], labels[train], features[test], labels[test], 1e-3) > 0.9
    shuffled = probe_accuracy(features[train], RNG.permutation(labels[train]), features[test], labels[test], 1e-3)
    assert abs(shuffled - 0.25) < 0.08


# ---- the token table and the samples ---------------------------------------------------------------------


def test_sentences_never_cross_documents_and_position_zero_is_left_out(store_path):
    with ActivationStore(store_path) as store:
        table = token_table(store, tiny_tokenizer(), include_first_position=False)
    assert (table.sentence[table.pos == 0] == -1).all() and (table.sentence[table.pos > 0] >= 0).all()
    kept = table.sentence >= 0
    per_sentence = pl.DataFrame({"sentence": table.sentence[kept], "doc": table.doc[kept]})
    assert per_sentence.group_by("sentence").agg(pl.col("doc").n_unique())["doc"].max() == 1
    assert len(table.sentence_split) == N_DOCS * 3  # a full stop ends positions 9, 19, 29
    assert table.registers == sorted(REGISTERS)


def test_whole_document_samples_respect_split_and_budget(store_path):
    with ActivationStore(store_path) as store:
        table: TokenTable = token_table(store, tiny_tokenizer(), include_first_position=False)
    eligible = table.sentence >= 0
    mask = whole_document_sample(table, "heldout", eligible, 200, np.random.default_rng(0))
    docs = np.unique(table.doc[mask])
    assert set(table.doc_split[docs]) == {"heldout"} and mask.sum() <= 200
    assert all(mask[table.doc == d].sum() == eligible[table.doc == d].sum() for d in docs)  # whole documents
    with pytest.raises(ConfigError, match=r"no documents in split 'test'.*geometry.split"):
        whole_document_sample(table, "test", eligible, 200, np.random.default_rng(0))


# ---- the whole measurement ---------------------------------------------------------------------------


def test_every_metric_is_measured_for_every_processing_and_register(measured):
    table = measured.metrics
    assert set(table["processing"]) == set(GeometrySettings().processings)
    assert set(table["register"]) == {"all", *REGISTERS}
    assert set(table.filter(pl.col("register") != "all")["processing"]) == {"none"}  # register_processings
    assert set(table["relative_depth"]) == {0.5, 1.0}
    assert table["value"].is_finite().all()
    registers = table.filter((pl.col("register") != "all") & (pl.col("metric") == "isoscore") & (pl.col("layer") == 1))
    assert registers["n"].n_unique() == 1  # equal-size samples per register
    flows = measured.flow_losses
    assert set(flows["layer"]) == {1, 2} and flows.group_by("layer").agg(pl.col("kept").sum())["kept"].to_list() == [
        1,
        1,
    ]
    best = flows.group_by("layer").agg(pl.col("validation_loss").min())
    kept = flows.filter(pl.col("kept")).select("layer", "validation_loss")
    assert kept.sort("layer").equals(best.sort("layer"))  # the kept epoch has the best held-back loss


def test_the_planted_structure_is_found(measured):
    table, rogue = measured.metrics, measured.rogue
    top = rogue.filter((pl.col("layer") == 1) & (pl.col("processing") == "none") & (pl.col("kind") == "cosine"))
    assert top.sort("rank")["dimension"][0] == 0  # the planted rogue dimension leads the cosine
    assert _value(table, "mean_cosine") > 0.5
    assert abs(_value(table, "mean_cosine", "standardise")) < 0.1  # fitted on train, measured on held-out
    assert _value(table, "isoscore", "whiten") > _value(table, "isoscore")
    assert _value(table, "register_probe_accuracy") > _value(table, "register_probe_shuffled") + 0.3
    assert _value(table, "position_probe_accuracy") > _value(table, "position_probe_majority") + 0.1
    assert _value(table, "passage_register_auc", "centre") > 0.9  # centring removes the shared offset
    assert _value(table, "norm_mean") < 20  # the 50x attention-sink rows are left out


def test_measurement_is_deterministic(store_path, measured):
    with ActivationStore(store_path) as store:
        again = measure_geometry(store, tiny_tokenizer(), GeometrySettings.from_config({"layers": [1, 2], **FAST}))
    assert again.metrics.equals(measured.metrics) and again.rogue.equals(measured.rogue)


def test_bad_settings_and_bad_stores_fail_clearly(store_path, tmp_path):
    with pytest.raises(ConfigError, match=r"geometry.wobble"):
        GeometrySettings.from_config({"wobble": 1})
    with pytest.raises(ConfigError, match=r"geometry.processings names \['sharpen'\]"):
        GeometrySettings.from_config({"processings": ["none", "sharpen"]})
    with pytest.raises(ConfigError, match=r"register_processings \['flow'\] must also be in geometry.processings"):
        GeometrySettings.from_config({"processings": ["none"], "register_processings": ["flow"]})
    with ActivationStore(store_path) as store, pytest.raises(ConfigError, match=r"geometry.layers selects \[0\]"):
        measure_geometry(store, tiny_tokenizer(), GeometrySettings(layers=[0]))
    poisoned = tmp_path / "poisoned.h5"
    _write_store(poisoned, poison=True)
    with ActivationStore(poisoned) as store, pytest.raises(StoreError, match=r"non-finite.*store_dtype: float32"):
        measure_geometry(store, tiny_tokenizer(), GeometrySettings.from_config({"layers": [1], **FAST}))


def test_pooled_states_are_bounded_by_settings_not_by_the_store(store_path):
    """Sentences for the flow are capped by max_sentences; passages are the measured sample's documents only."""
    settings = GeometrySettings.from_config({"layers": [1], "max_sentences": 20, "max_states": 200, **FAST})
    with ActivationStore(store_path) as store:
        result = measure_geometry(store, tiny_tokenizer(), settings)
    assert set(result.flow_losses["sentences"]) == {20}
    passages = result.metrics.filter(pl.col("metric") == "passage_register_auc")["n"]
    assert set(passages) == {200 // (DOC_LENGTH - 1)}  # whole documents of 29 eligible tokens within 200 states


# ---- massive tokens, power and intervals, intra-sentence similarity (issue 17, items 5, 8 and 9) --------------

# rows (doc * DOC_LENGTH + pos): documents 1 and 13 are held out (measured), document 5 is a training document
MASSIVE = {37: ("d1", 7), 412: ("d13", 22), 153: ("d5", 3)}


@pytest.fixture(scope="module")
def massive_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("massive") / "store.h5"
    states = _write_store(path, massive=tuple(MASSIVE))
    settings = GeometrySettings.from_config({"layers": [1, 2], "power_ratio": 10, "bootstrap": 20, **FAST})
    with ActivationStore(path) as store:
        tokens = store.tokens()
        return states.astype(np.float32).astype(np.float64), tokens, measure_geometry(store, tiny_tokenizer(), settings)


def _row(table: pl.DataFrame, metric: str, processing: str = "none", register: str = "all") -> dict:
    rows = table.filter(
        (pl.col("metric") == metric) & (pl.col("processing") == processing) & (pl.col("register") == register)
        & (pl.col("layer") == 1)
    )  # fmt: skip
    assert rows.height == 1, (metric, processing, register)
    return rows.row(0, named=True)


def _heldout_rows(tokens: pl.DataFrame) -> np.ndarray:
    """Rows of the held-out documents past position 0: what the default max_states measures whole."""
    doc, pos = tokens["doc"].to_numpy(), tokens["pos"].to_numpy()
    return np.flatnonzero(((doc // len(REGISTERS)) % 3 == 0) & (pos > 0))


def test_planted_massive_tokens_are_listed_with_their_document_position_and_token(massive_store):
    _, tokens, result = massive_store
    found = result.massive.filter(pl.col("layer") == 1).sort("doc_id")
    expected = sorted(
        (doc_id, position, int(tokens["token_id"][row]), row in _heldout_rows(tokens))
        for row, (doc_id, position) in MASSIVE.items()
    )
    assert list(zip(found["doc_id"], found["position"], found["token_id"], found["measured"], strict=True)) == expected
    texts = [tiny_tokenizer().decode([token]) for token in found["token_id"]]
    assert found["token"].to_list() == texts and (found["ratio"] > 10).all()
    assert set(found["split"]) == {"heldout", "train"}
    assert set(result.massive.filter(pl.col("layer") == 2)["doc_id"]) == {"d1", "d13", "d5"}


def test_spectrum_metrics_without_massive_tokens_equal_those_of_the_clean_sample(massive_store):
    states, tokens, result = massive_store
    table = result.metrics
    measured = _heldout_rows(tokens)
    clean = np.setdiff1d(measured, list(MASSIVE))
    for rows, suffix, label in ((clean, "", "removed"), (measured, "_with_massive", "kept")):
        iso, rank = _row(table, "isoscore" + suffix), _row(table, "effective_rank" + suffix)
        assert iso["value"] == pytest.approx(float(reference_isoscore(states[rows])), abs=1e-6)
        singular = np.linalg.svd(states[rows] - states[rows].mean(0), compute_uv=False)
        p = singular / singular.sum()
        assert rank["value"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
        assert iso["n"] == len(rows) and iso["massive_tokens"] == label and iso["documents"] == N_DOCS // 3
        assert iso["powered"] is (len(rows) >= 10 * D)
    assert _row(table, "isoscore")["value"] > 2 * _row(table, "isoscore_with_massive")["value"]  # one token decides
    assert _row(table, "mean_cosine")["massive_tokens"] == "kept" and _row(table, "mean_cosine")["powered"] is None


def test_spectrum_rows_carry_power_and_intervals_where_configured(massive_store):
    table = massive_store[2].metrics
    headline = _row(table, "isoscore")
    assert headline["powered"] and headline["ci_low"] < headline["ci_high"]
    assert _row(table, "isoscore", "whiten")["ci_low"] is None  # bootstrap_processings: [none]
    assert _row(table, "isoscore_with_massive")["ci_low"] is None  # the interval is the figures' value's
    register = _row(table, "effective_rank", register="news")
    assert register["n"] == 4 * (DOC_LENGTH - 1) and register["powered"] is False  # 116 < 10 · 16
    assert register["documents"] == 4 and register["ci_low"] is None  # too few documents for an interval


def test_intra_sentence_similarity_is_computed_per_sentence(massive_store):
    """Every held-out document has three sentences (full stops at positions 9, 19, 29): recompute by hand."""
    states, tokens, result = massive_store
    table = result.metrics
    rows = _heldout_rows(tokens)
    doc, pos = tokens["doc"].to_numpy()[rows], tokens["pos"].to_numpy()[rows]

    def intra(members: np.ndarray) -> float:
        block = states[members]
        mean = block.mean(0)
        return float(np.mean(block @ mean / (np.linalg.norm(block, axis=1) * np.linalg.norm(mean))))

    def by_sentence(keep: np.ndarray) -> list[float]:
        return [intra(rows[keep & (doc == d) & (pos // 10 == s)]) for d in np.unique(doc[keep]) for s in range(3)]

    everything = np.ones(len(rows), dtype=bool)
    row = _row(table, "intra_similarity")
    assert row["value"] == pytest.approx(np.mean(by_sentence(everything)), rel=1e-9) and row["n"] == 3 * 16
    per_passage = np.mean([intra(rows[doc == d]) for d in np.unique(doc)])
    assert abs(row["value"] - per_passage) > 0.01  # not the per-passage quantity it replaced
    for index, register in enumerate(REGISTERS):
        keep = doc % len(REGISTERS) == index
        value = _row(table, "intra_similarity", register=register)["value"]
        assert value == pytest.approx(np.mean(by_sentence(keep)), rel=1e-9)
        adjusted = _row(table, "intra_similarity_adjusted", register=register)["value"]
        assert adjusted == pytest.approx(value - _row(table, "mean_cosine", register=register)["value"])


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"processings": ["none"], "bootstrap_processings": ["whiten"]}, r"bootstrap_processings \['whiten'\] must"),
        ({"bootstrap": -1}, r"geometry.bootstrap must be an integer >= 0"),
        ({"confidence": 1.5}, r"geometry.confidence must lie in \(0, 1\)"),
        ({"massive_multiple": 0.5}, r"geometry.massive_multiple must exceed 1"),
        ({"power_ratio": 0}, r"geometry.power_ratio must be positive"),
    ],
)
def test_bad_power_bootstrap_and_massive_settings_name_their_key(section, message):
    with pytest.raises(ConfigError, match=message):
        GeometrySettings.from_config(section)
