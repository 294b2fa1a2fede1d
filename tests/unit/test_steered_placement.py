"""Placing generated states relative to the stored data: planted states, brute-force spacing, lens agreement."""

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.lenses.base import Unembed
from latent_atlas.lenses.logit import LogitLens
from latent_atlas.neighbourhood.pipeline import NeighbourhoodSettings
from latent_atlas.neighbourhood.steered import place_states, place_steered_states, summarise_placement
from latent_atlas.steering.generate import StateCapture, generate, write_states
from latent_atlas.store import ActivationStore

LAYER = 2


@pytest.fixture(scope="module")
def placed_setup(tiny_model_dirs, tmp_path_factory):
    from latent_atlas.extract import ExtractionSettings, extract_activations
    from latent_atlas.models import load_model
    from tests.conftest import STORE_ATTRS
    from tests.unit.test_lenses import _random_corpus

    root = tmp_path_factory.mktemp("steered")
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    extract_activations(loaded, _random_corpus(12), root / "s.h5", ExtractionSettings(device="cpu"), STORE_ATTRS, False)
    return loaded, root


def _records(n: int, prompts: list[int], coefficients: list[float], top1: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "state": np.arange(n),
            "row": 0,
            "coefficient": coefficients,
            "step": np.arange(n),
            "token_id": np.full(n, 5),
            "model_top1_id": top1,
            "after_eos": [False] * (n - 1) + [True],
            "prompt_id": prompts,
            "decoding": "greedy",
            "sample": 0,
            "layer": 1,
        }
    )


def test_planted_states_are_placed_as_a_brute_force_search_places_them(placed_setup):
    loaded, root = placed_setup
    with ActivationStore(root / "s.h5") as store:
        stored = store.read(LAYER, np.arange(store.n_tokens))
        kept = store.tokens()["pos"].to_numpy() > 0
        norm = float(np.median(np.linalg.norm(stored[kept], axis=1)))
        rows = np.flatnonzero(kept)[[3, 10, 20, 40]]
        planted = np.stack(
            [stored[rows[0]], stored[rows[1]] + 1e-3, stored[rows[2]] * 1.5, stored[rows[3]] + 10 * norm, stored[0]]
        ).astype(np.float32)
        lens = LogitLens(Unembed.from_parts(loaded.parts))
        with torch.no_grad():  # what the model reads at the last layer, applied to every state: an independent top-1
            top1 = loaded.parts.lm_head(loaded.parts.final_norm(torch.from_numpy(planted))).argmax(-1).numpy()
        top1[1] = top1[1] + 1  # one state whose model's next token the lens does not read
        records = _records(5, [0, 0, 1, 1, 2], [0.0, 0.0, 1.0, 1.0, 1.0], top1)
        settings = NeighbourhoodSettings(block_rows=64)
        table = place_states(loaded, store, "actadd", records, {LAYER: planted, 99: planted}, {"logit": lens}, settings)
    assert table.height == 4  # the state after EOS left out; layer 99 is not stored
    assert set(table["layer"]) == {LAYER} and set(table["steered_layer"]) == {1}
    everything = stored[kept].astype(np.float64)
    kept_rows = np.flatnonzero(kept)
    for i, state in enumerate(planted[:4].astype(np.float64)):
        distances = np.linalg.norm(everything - state, axis=1)
        nearest = kept_rows[distances.argmin()]
        others = np.linalg.norm(everything - stored[nearest].astype(np.float64), axis=1)
        spacing = np.sort(others)[1] / norm  # its nearest *other* stored state
        row = table.row(i, named=True)
        assert row["nn_row"] == nearest
        assert row["nn_distance"] == pytest.approx(distances.min() / norm, abs=1e-5)
        assert row["local_spacing"] == pytest.approx(spacing, rel=1e-4)
        assert row["distance_ratio"] == pytest.approx(row["nn_distance"] / spacing, rel=1e-4)
    assert table["nn_row"][0] == rows[0] and table["distance_ratio"][0] == pytest.approx(0.0, abs=1e-6)
    assert table["distance_ratio"][3] > 5  # a state pushed off the data
    assert table["logit_agrees"].to_list() == [1.0, 0.0, 1.0, 1.0]
    expected = [loaded.tokenizer.decode([int(i)]) for i in top1[:4]]
    assert table["logit_top1"].to_list()[0] == expected[0] and table["logit_top1"].to_list()[2:] == expected[2:]


def test_summary_resamples_prompts_and_the_figure_is_drawn(placed_setup, tmp_path):
    from latent_atlas.plots.steered import plot_steered_states

    loaded, root = placed_setup
    coefficients = [0.0, 2.0]
    intervention_vector = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(0))
    from latent_atlas.steering.interventions import ResidualAddition

    intervention = ResidualAddition(1, intervention_vector, coefficients, "all")
    capture = StateCapture((1, LAYER), context={"method": "mean_difference"})
    for prompt_id, text in enumerate(["the dog saw", "a small red house", "one day the", "the water was"]):
        capture.context.update(prompt_id=prompt_id, decoding="greedy", sample=0, layer=1)
        generate(loaded, text, intervention, 2, 4, capture=capture)
    write_states(tmp_path / "md.states.h5", capture, {})
    lens = LogitLens(Unembed.from_parts(loaded.parts))
    with ActivationStore(root / "s.h5") as store:
        table = place_steered_states(
            loaded, store, {"mean_difference": tmp_path / "md.states.h5"}, {"logit": lens}, NeighbourhoodSettings()
        )
    summary = summarise_placement(table, replicates=200)
    ratio = summary.filter(pl.col("value") == "distance_ratio", pl.col("layer") == LAYER, pl.col("coefficient") == 2.0)
    rows = table.filter(pl.col("layer") == LAYER, pl.col("coefficient") == 2.0)
    assert ratio["estimate"][0] == pytest.approx(rows["distance_ratio"].mean())
    assert ratio["n"][0] == 4 and ratio["unit"][0] == "prompt" and ratio["states"][0] == rows.height
    assert ratio["ci_low"][0] <= ratio["estimate"][0] <= ratio["ci_high"][0]
    per_prompt = rows.group_by("prompt_id").agg(pl.col("distance_ratio").mean())["distance_ratio"]
    assert per_prompt.min() - 1e-9 <= ratio["ci_low"][0] and ratio["ci_high"][0] <= per_prompt.max() + 1e-9
    assert set(summary["value"]) == {"distance_ratio", "logit_agrees"}
    plot_steered_states(summary, tmp_path / "f.pdf", tmp_path / "f.png", "test")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_the_cap_draws_at_most_that_many_states_per_setting_and_the_same_ones_each_time():
    from latent_atlas.neighbourhood.steered import subsample_states

    sizes = {(1, "greedy", 0.0): 30, (1, "sampled", 0.0): 3, (2, "greedy", 4.0): 12}
    rows = [(layer, decoding, c) for (layer, decoding, c), size in sizes.items() for _ in range(size)]
    records = pl.DataFrame(rows, schema=["layer", "decoding", "coefficient"], orient="row").with_row_index("state")
    capped = subsample_states(records, "actadd", 5, seed=0)
    groups = capped.group_by(["layer", "decoding", "coefficient"]).len()
    counts = {(layer, decoding, c): n for layer, decoding, c, n in groups.iter_rows()}
    assert counts == {(1, "greedy", 0.0): 5, (1, "sampled", 0.0): 3, (2, "greedy", 4.0): 5}
    assert capped.join(records, on="state").filter(pl.col("layer") != pl.col("layer_right")).is_empty()
    assert capped["state"].to_list() == subsample_states(records, "actadd", 5, seed=0)["state"].to_list()
    assert subsample_states(records, "actadd", None, seed=0).equals(records)
    draws = {tuple(subsample_states(records, method, 5, seed=0)["state"]) for method in ("actadd", "icv", "x", "y")}
    assert len(draws) > 1  # each method draws its own states


def test_a_state_whose_nearest_stored_state_has_a_twin_gets_no_ratio(tiny_model_dirs, tmp_path):
    from latent_atlas.extract import ExtractionSettings, extract_activations
    from latent_atlas.models import load_model
    from tests.conftest import STORE_ATTRS
    from tests.unit.test_lenses import _random_corpus

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    corpus = _random_corpus(6)
    twin = corpus.slice(1, 1).with_columns(doc_id=pl.lit("twin"))  # the same text twice: identical stored states
    extract_activations(
        loaded, pl.concat([corpus, twin]), tmp_path / "s.h5", ExtractionSettings(device="cpu"), STORE_ATTRS, False
    )
    with ActivationStore(tmp_path / "s.h5") as store:
        docs, tokens = store.docs()["doc_id"].to_list(), store.tokens()
        row, other = (
            int(tokens.filter(pl.col("doc") == docs.index(doc_id), pl.col("pos") == 3)["row"][0])
            for doc_id in ("twin", "r2")
        )
        planted = store.read(LAYER, np.array([row, other, other])).astype(np.float32)
        records = _records(3, [0, 1, 2], [0.0, 0.0, 0.0], np.zeros(3, dtype=np.int64)).with_columns(after_eos=False)
        table = place_states(loaded, store, "actadd", records, {LAYER: planted}, {}, NeighbourhoodSettings())
    assert table["local_spacing"][0] == 0.0 and table["distance_ratio"][0] is None
    assert table["local_spacing"][1] > 0 and table["distance_ratio"][1] == pytest.approx(0.0, abs=1e-6)
    summary = summarise_placement(table, replicates=50).filter(pl.col("value") == "distance_ratio")
    assert summary["states"][0] == 2 and summary["n"][0] == 2 and np.isfinite(summary["estimate"][0])
