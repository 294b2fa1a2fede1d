"""Neighbourhoods: exact kNN against brute force, bounded memory, sampling and paths, decoding invariants."""

import dataclasses
import tracemalloc

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.errors import ConfigError
from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.lenses.base import Unembed
from latent_atlas.lenses.patchscope import residual_state
from latent_atlas.lenses.pipeline import build_lenses
from latent_atlas.lenses.tuned import TunedLens
from latent_atlas.models import load_model
from latent_atlas.neighbourhood import knn
from latent_atlas.neighbourhood.decode import Context, compare_with_reference, model_logits
from latent_atlas.neighbourhood.knn import layer_statistics, nearest_stored, token_contexts
from latent_atlas.neighbourhood.pipeline import (
    NeighbourhoodSettings,
    data_neighbours,
    explore_path,
    explore_point,
)
from latent_atlas.neighbourhood.sampling import (
    family_bases,
    interpolate,
    path_positions,
    rogue_dimensions,
    sample_around,
)
from latent_atlas.store import ActivationStore, StoreWriter
from tests.conftest import STORE_ATTRS
from tests.unit.test_lenses import _random_corpus

D = 16


def _synthetic_store(path, n_docs: int = 20, doc_length: int = 25, d: int = D, seed: int = 0) -> np.ndarray:
    """A store of random states at resid.01 with one rogue dimension (0); returns the states."""
    rng = np.random.default_rng(seed)
    n = n_docs * doc_length
    states = rng.standard_normal((n, d)).astype(np.float32)
    states[:, 0] += 6.0  # a rogue dimension: a large shared offset dominates every cosine
    states[::doc_length] *= 20.0  # position 0: huge "attention sink" norms, excluded by default
    docs = pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n_docs)],
            "label": ["x"] * n_docs,
            "split": ["train"] * n_docs,
            "token_start": np.arange(n_docs) * doc_length,
            "token_count": [doc_length] * n_docs,
        }
    )
    attrs = {**STORE_ATTRS, "model_sha256": "f" * 64, "code_version": "v", "n_layers": 1, "created": "now"}
    with StoreWriter(path, n, d, [1], "float32", attrs) as writer:
        writer.write_tokens(
            rng.integers(0, 50, n), np.repeat(np.arange(n_docs), doc_length), np.tile(np.arange(doc_length), n_docs)
        )
        writer.write_docs(docs)
        writer.write_states("resid.01", 0, states)
        writer.write_states("ln_final", 0, states)
    return states


def _brute_force(states, keep, queries, k, metric, mean=None, std=None):
    x, q = states[keep].astype(np.float64), queries.astype(np.float64)
    if mean is not None:
        x, q = (x - mean) / std, (q - mean) / std
    if metric == "cosine":
        scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
        order = np.argsort(-scores, axis=1)[:, :k]
    else:
        scores = np.linalg.norm(q[:, None] - x[None], axis=-1)
        order = np.argsort(scores, axis=1)[:, :k]
    return np.flatnonzero(keep)[order], np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("standardise", [False, True])
@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])  # streamed block by block, or the layer cached in RAM
def test_nearest_stored_equals_brute_force(tmp_path, metric, standardise, skip_first, cache_bytes):
    states = _synthetic_store(tmp_path / "s.h5")
    keep = np.ones(len(states), bool)
    if skip_first:
        keep[::25] = False
    queries = np.random.default_rng(1).standard_normal((7, D)).astype(np.float32) + states[3]
    with ActivationStore(tmp_path / "s.h5") as store:
        statistics = layer_statistics(store, 1, skip_first) if standardise else None
        found = nearest_stored(store, 1, queries, 12, metric, statistics, skip_first, 37, cache_bytes)
        again = nearest_stored(store, 1, queries, 12, metric, statistics, skip_first, 37, cache_bytes)
    np.testing.assert_array_equal(again.rows, found.rows)  # a second search (from the cache, if cached) agrees
    mean, std = (statistics.mean, statistics.std) if standardise else (None, None)
    rows, scores = _brute_force(states, keep, queries, 12, metric, mean, std)
    np.testing.assert_array_equal(found.rows, rows)
    np.testing.assert_allclose(found.scores, scores, rtol=1e-5, atol=1e-5)


def test_a_stored_state_is_its_own_nearest_neighbour_at_distance_zero(tmp_path):
    states = _synthetic_store(tmp_path / "s.h5")
    with ActivationStore(tmp_path / "s.h5") as store:
        found = nearest_stored(store, 1, states[[5, 77, 301]], 1, "euclidean", block_rows=64)
    np.testing.assert_array_equal(found.rows[:, 0], [5, 77, 301])
    np.testing.assert_array_equal(found.scores[:, 0], 0.0)


def test_layer_statistics_match_the_whole_array(tmp_path):
    states = _synthetic_store(tmp_path / "s.h5")
    kept = np.delete(states, np.arange(0, len(states), 25), axis=0).astype(np.float64)
    with ActivationStore(tmp_path / "s.h5") as store:
        statistics = layer_statistics(store, 1, block_rows=33)
    np.testing.assert_allclose(statistics.mean, kept.mean(0), rtol=1e-10)
    np.testing.assert_allclose(statistics.std, kept.std(0), rtol=1e-10)
    assert statistics.typical_norm == pytest.approx(np.median(np.linalg.norm(kept, axis=1)))
    units = kept / np.linalg.norm(kept, axis=1, keepdims=True)
    pairwise = units @ units.T
    mean_cosine = (pairwise.sum() - np.trace(pairwise)) / (len(kept) * (len(kept) - 1))
    assert statistics.cosine_share.sum() == pytest.approx(mean_cosine, rel=1e-9)  # Σ_i CC_i = mean cosine
    assert rogue_dimensions(statistics, 1).tolist() == [0]
    standardised = statistics.standardise(kept.astype(np.float32))
    np.testing.assert_allclose(standardised.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(standardised.std(0), 1, atol=1e-5)


def test_search_memory_is_bounded_by_the_block_not_the_store(tmp_path, monkeypatch):
    _synthetic_store(tmp_path / "big.h5", n_docs=400, doc_length=100, d=64)  # 40 000 x 64 float32 = 10 MiB
    block = 1000
    largest_read = []
    original = ActivationStore.read

    def spy(self, address, rows=None, dtype=np.float32):
        result = original(self, address, rows, dtype)
        largest_read.append(len(result))
        return result

    monkeypatch.setattr(ActivationStore, "read", spy)
    queries = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    with ActivationStore(tmp_path / "big.h5") as store:
        tracemalloc.start()
        nearest_stored(store, 1, queries, 10, "euclidean", block_rows=block, cache_bytes=0)  # too large to cache
        layer_statistics(store, 1, block_rows=block)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        store_bytes = store.n_tokens * store.d_model * 4
    assert max(largest_read) <= block
    assert peak < store_bytes / 4, f"peak {peak} bytes for a {store_bytes}-byte layer"


def test_token_contexts_mark_the_token_and_stay_in_the_document(tmp_path):
    _synthetic_store(tmp_path / "s.h5")
    with ActivationStore(tmp_path / "s.h5") as store:
        ids = store.tokens()["token_id"].to_numpy()
        contexts = token_contexts(store, lambda t: " ".join(map(str, t)), [25, 30, 49], window=2)
    assert contexts[0] == f"⟦{ids[25]}⟧{ids[26]} {ids[27]}"  # first token of a document: nothing before it
    assert contexts[1] == f"{ids[28]} {ids[29]}⟦{ids[30]}⟧{ids[31]} {ids[32]}"
    assert contexts[2] == f"{ids[47]} {ids[48]}⟦{ids[49]}⟧"  # last token of a document: nothing after it


def test_samples_lie_at_their_radius_in_their_familys_span(tmp_path):
    states = _synthetic_store(tmp_path / "s.h5")
    with ActivationStore(tmp_path / "s.h5") as store:
        statistics = layer_statistics(store, 1)
    centre = states[7]
    bases = family_bases(statistics, states[30:94], local_components=4, rogue_count=2)
    samples = sample_around(centre, bases, [0.0, 0.1, 0.5], 5, statistics.typical_norm, seed=3, point="p")
    offsets = samples.vectors.astype(np.float64) - centre
    np.testing.assert_array_equal(samples.vectors[samples.radius == 0], np.broadcast_to(centre, (20, D)))
    np.testing.assert_allclose(
        np.linalg.norm(offsets, axis=1), samples.radius * statistics.typical_norm, rtol=1e-5, atol=1e-5
    )
    for family, basis in bases.items():
        rows = np.array(samples.family) == family
        projected = offsets[rows] @ basis.T @ basis  # offsets stay in the family's span
        np.testing.assert_allclose(projected, offsets[rows], atol=1e-4)
    rogue = offsets[np.array(samples.family) == "rogue"]
    dimensions = np.flatnonzero(np.abs(bases["rogue"]).sum(0))
    assert 0 in dimensions and np.abs(np.delete(rogue, dimensions, axis=1)).max() == 0
    again = sample_around(centre, bases, [0.0, 0.1, 0.5], 5, statistics.typical_norm, seed=3, point="p")
    other = sample_around(centre, bases, [0.0, 0.1, 0.5], 5, statistics.typical_norm, seed=4, point="p")
    np.testing.assert_array_equal(again.vectors, samples.vectors)
    assert not np.array_equal(other.vectors, samples.vectors)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolation_reproduces_its_endpoints_exactly(method):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    t = path_positions(4, extrapolation=2)
    assert t[2] == 0.0 and t[6] == 1.0
    path = interpolate(a, b, t, method)
    np.testing.assert_array_equal(path[2], a)
    np.testing.assert_array_equal(path[6], b)
    if method == "linear":
        np.testing.assert_allclose(path[4], (a + b) / 2, rtol=1e-6)
        np.testing.assert_allclose(path[0], a - (b - a) / 2, rtol=1e-5)  # extrapolation continues the line
    else:
        unit_b = b * np.linalg.norm(a) / np.linalg.norm(b)  # equal norms: slerp stays on the sphere
        norms = np.linalg.norm(interpolate(a, unit_b, t, method), axis=1)
        np.testing.assert_allclose(norms, np.linalg.norm(a), rtol=1e-5)


def test_compare_with_reference_metrics():
    reference = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    logits = torch.stack([reference, torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0])])
    metrics = compare_with_reference(reference, logits, k=2)
    assert metrics["top1_retained"].tolist() == [True, False]
    assert metrics["jaccard_topk"].tolist() == [1.0, 0.0]
    assert metrics["kl_to_reference"][0] == 0.0 and metrics["kl_to_reference"][1] > 0
    p = torch.softmax(reference.double(), -1)
    assert metrics["entropy"][0] == pytest.approx(float(-(p * p.log()).sum()))


def test_model_decoder_at_the_centre_is_the_models_own_prediction(tiny_loaded):
    text = "the dog saw a cat at night"
    state = residual_state(tiny_loaded, text, 2, position=3)
    patched = model_logits(tiny_loaded, state[None], 2, Context(text, 3))
    with torch.no_grad():
        own = tiny_loaded.model(**tiny_loaded.tokenizer(text, return_tensors="pt")).logits[0, 3]
    torch.testing.assert_close(patched[0], own, atol=1e-4, rtol=0)


PROBES = {
    "dog": {"text": "the dog saw the", "layer": 2, "position": 1},
    "cat": {"text": "a small cat", "layer": 2},
    "mid": {"midpoint": ["dog", "cat"]},
}


@pytest.fixture(scope="module")
def explored(tiny_model_dirs, tmp_path_factory):
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    path = tmp_path_factory.mktemp("neighbourhood") / "s.h5"
    extract_activations(loaded, _random_corpus(60), path, ExtractionSettings(device="cpu"), STORE_ATTRS, False)
    unembed = Unembed.from_parts(loaded.parts)
    tuned = TunedLens(unembed, loaded.n_layers, loaded.d_model)
    tuned.trained_layers = [0, 1, 2]  # untrained translators: the logit lens, but read as the tuned lens
    lenses = build_lenses(loaded, {}, tuned)
    settings = NeighbourhoodSettings(radii=(0.0, 0.2, 1.0), samples=4, model_samples=2, local_k=16, block_rows=50)
    with ActivationStore(path) as store:
        table = explore_point(loaded, store, "dog", PROBES, lenses, settings)
        rerun = explore_point(loaded, store, "dog", PROBES, lenses, settings)
        reseeded = explore_point(loaded, store, "dog", PROBES, lenses, dataclasses.replace(settings, seed=1))
        walk = explore_path(loaded, store, "dog-cat", ["dog", "cat"], PROBES, lenses, settings)
    return loaded, path, lenses, settings, table, rerun, reseeded, walk


def test_radius_zero_reproduces_the_centres_decoding_exactly(explored):
    table = explored[4]
    assert set(table["decoder"]) == {"logit", "tuned", "semantic_basis", "model"}
    at_centre = table.filter(pl.col("kind") != "data", pl.col("radius") == 0)
    assert at_centre.height == (1 + 4 * 4) * 3 + (1 + 4 * 2)  # lenses see every sample, the model a subset
    assert at_centre["top1_retained"].all()
    assert (at_centre["kl_to_reference"] == 0).all() and (at_centre["jaccard_topk"] == 1).all()
    far = table.filter(pl.col("kind") == "sample", pl.col("radius") == 1.0, pl.col("decoder") == "logit")
    assert far["kl_to_reference"].mean() > 0
    assert (table.filter(pl.col("kind") == "sample")["nn_distance"] > 0).all()
    data = table.filter(pl.col("kind") == "data")
    assert (data["nn_row"] != data["data_row"]).all() and (data["nn_distance"] >= 0).all()  # the nearest *other* state
    assert table["nn_context"].str.contains("⟦").all()


def test_neighbourhood_tables_are_identical_across_reruns_with_the_same_seed(explored):
    table, rerun, reseeded = explored[4:7]
    assert table.equals(rerun)
    samples = pl.col("kind") == "sample"
    assert not table.filter(samples)["pca1"].equals(reseeded.filter(samples)["pca1"])


def test_paths_reproduce_their_endpoints(explored):
    walk = explored[7]
    start, end = walk.filter(pl.col("t") == 0), walk.filter(pl.col("t") == 1)
    assert start.height == end.height == 2 * 4  # linear and slerp, four decoders
    assert (start["kl_to_reference"] == 0).all() and start["top1_retained"].all()
    assert (end["kl_to_end"] == 0).all() and end["top1_is_end"].all()
    assert walk["t"].min() < 0 and walk["t"].max() > 1


def test_data_neighbours_of_a_stored_state_start_with_itself(explored):
    loaded, path, _, settings = explored[:4]
    with ActivationStore(path) as store:
        row = int(np.flatnonzero(store.tokens()["pos"].to_numpy() == 5)[0])
        table = data_neighbours(store, loaded.tokenizer.decode, store.read(2, [row])[0], 2, settings)
    first = table.filter(pl.col("rank") == 1)
    assert first.height == 4 and (first["row"] == row).all()
    assert first.filter(pl.col("metric") == "euclidean")["score"].to_list() == [0.0, 0.0]


def test_a_layer_the_store_lacks_is_a_config_error(explored, tmp_path):
    loaded, _, lenses, settings = explored[:4]
    _synthetic_store(tmp_path / "s.h5")
    with ActivationStore(tmp_path / "s.h5") as store, pytest.raises(ConfigError, match=r"extraction\.layers"):
        explore_point(loaded, store, "dog", PROBES, lenses, settings)


def test_identity_context_reads_the_token_after_the_arrow(tiny_loaded):
    context = Context.identity(tiny_loaded.tokenizer)
    ids = tiny_loaded.tokenizer(context.text)["input_ids"]
    placeholder = tiny_loaded.tokenizer(context.text[: -len(" ->")])["input_ids"]
    assert context.position == len(placeholder) - 1 < len(ids) - 1
    state = residual_state(tiny_loaded, "a small cat", 1)
    assert model_logits(tiny_loaded, state[None], 1, context).shape == (1, tiny_loaded.manifest["vocab_size"])


def test_typical_norm_is_the_statistics_median(tmp_path):
    from latent_atlas.neighbourhood.knn import typical_norm

    _synthetic_store(tmp_path / "s.h5")
    with ActivationStore(tmp_path / "s.h5") as store:
        assert typical_norm(store, 1, block_rows=40) == pytest.approx(layer_statistics(store, 1).typical_norm, rel=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cached_search_over_many_score_blocks_finds_the_streamed_neighbours(tmp_path, monkeypatch, metric):
    states = _synthetic_store(tmp_path / "big.h5", n_docs=100, doc_length=100, d=64)
    monkeypatch.setattr(knn, "_SCORE_BLOCK_VALUES", 1)  # 1,024 cached rows per score block: 10 blocks
    queries = np.random.default_rng(2).standard_normal((9, 64)).astype(np.float32) + states[[4, 5, 6]].mean(0)
    with ActivationStore(tmp_path / "big.h5") as store:
        cached = nearest_stored(store, 1, queries, 10, metric, block_rows=999)
        streamed = nearest_stored(store, 1, queries, 10, metric, block_rows=999, cache_bytes=0)
    keep = np.ones(len(states), bool)
    keep[::100] = False
    rows, _ = _brute_force(states, keep, queries, 10, metric)
    np.testing.assert_array_equal(cached.rows, rows)
    np.testing.assert_array_equal(streamed.rows, rows)
    np.testing.assert_allclose(cached.scores, streamed.scores, rtol=1e-6, atol=1e-6)
