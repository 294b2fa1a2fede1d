"""The atlas's data against direct computations (unembedding, brute-force search), and its page's promises."""

import json
import re
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.atlas import inputs
from latent_atlas.atlas.data import AtlasSettings, atlas_data, atlas_layers, sample_documents, steering_runs
from latent_atlas.atlas.page import render_page, within_budget, write_page
from latent_atlas.errors import ConfigError, LatentAtlasError
from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.lenses.base import Unembed
from latent_atlas.lenses.tuned import TunedLens
from latent_atlas.store import ActivationStore
from latent_atlas.testing import _WORDS
from tests.conftest import STORE_ATTRS, untied_llama

SETTINGS = AtlasSettings(docs_per_label=2, max_tokens=10, top_k=4, neighbours_k=3, chunk_size=7, block_rows=50)
TUNED_LAYERS = [1, 2]  # layer 0 stays untrained (the page leaves the tuned lens out there); 3 is the identity


def _corpus(n_docs: int = 24, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "doc_id": [f"r{i:02d}" for i in range(n_docs)],
            "text": [" ".join(rng.choice(_WORDS, size=rng.integers(8, 20))) for _ in range(n_docs)],
            "label": ["alpha" if i % 2 else "beta" for i in range(n_docs)],
            "split": ["heldout" if i % 3 == 0 else "train" for i in range(n_docs)],
            "source": ["test"] * n_docs,
        }
    )


def build_case(root):
    """A tiny untied model, its store, a tuned lens with random translators, and the atlas data of both."""
    loaded = untied_llama(root, seed=0, intermediate_size=64, layers=3)
    store_path = root / "store.h5"
    extract_activations(loaded, _corpus(), store_path, ExtractionSettings(device="cpu"), STORE_ATTRS, False)
    tuned = TunedLens(Unembed.from_parts(loaded.parts), loaded.n_layers, loaded.d_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in TUNED_LAYERS:
            tuned.translators[layer].weight.normal_(0, 0.2, generator=generator)
            tuned.translators[layer].bias.normal_(0, 0.2, generator=generator)
    tuned.trained_layers = TUNED_LAYERS
    with ActivationStore(store_path) as store:
        payload = atlas_data(loaded, store, tuned, {}, SETTINGS)
    return SimpleNamespace(loaded=loaded, store_path=store_path, tuned=tuned, payload=payload)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build_case(tmp_path_factory.mktemp("atlas"))


def direct_readings(case, document: dict, layer: int) -> dict[str, np.ndarray]:
    """Each lens's float64 log-probabilities at one layer for a document's shown tokens, and the model's own.

    Logit lens: final_norm(h) @ W_U^T; tuned lens: final_norm(h + A h + b) @ W_U^T; the model: ln_final @ W_U^T.
    """
    rows = slice(document["token_start"], document["token_start"] + len(document["ids"]))
    with ActivationStore(case.store_path) as store:
        h, final = torch.from_numpy(store.read(layer, rows)), torch.from_numpy(store.read("ln_final", rows))
    parts, weight = case.loaded.parts, case.loaded.parts.lm_head.weight.double()
    translator = case.tuned.translators[layer] if layer < len(case.tuned.translators) else None
    translated = h if translator is None else h + h @ translator.weight.T + translator.bias
    with torch.no_grad():
        logits = {
            "logit": parts.final_norm(h).double() @ weight.T,
            "tuned": parts.final_norm(translated).double() @ weight.T,
            "model": final.double() @ weight.T,
        }
    return {name: torch.log_softmax(value, -1).numpy() for name, value in logits.items()}


def brute_force_scores(store_path, layer: int, rows: np.ndarray) -> np.ndarray:
    """Cosine of each query row with every stored row by a full float64 product; -inf at position 0 and itself."""
    with ActivationStore(store_path) as store:
        states = store.read(layer).astype(np.float64)
        keep = store.tokens()["pos"].to_numpy() > 0
    unit = states / np.linalg.norm(states, axis=1, keepdims=True)
    scores = unit[rows] @ unit.T
    scores[:, ~keep] = -np.inf
    scores[np.arange(len(rows)), rows] = -np.inf
    return scores


def check_neighbours(store_path, layer: int, rows: np.ndarray, found: list, scores: list, k: int) -> None:
    """The listed rows are k best by brute force: their true scores are the listed ones, and the k highest.

    (Rows with equal states, e.g. one token id at resid.00, tie: any of them may be listed.)
    """
    expected = brute_force_scores(store_path, layer, rows)
    best = -np.sort(-expected, axis=1)[:, :k]
    np.testing.assert_allclose(scores, best, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(expected, np.array(found), 1), best, atol=1e-4)
    assert all(len(set(listed)) == k for listed in found)


def test_documents_are_sampled_per_label_from_the_split_round_robin():
    docs = pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(12)],
            "label": ["a", "b", "c"] * 4,
            "split": ["heldout", "heldout", "train"] * 4,
            "token_start": range(12),
            "token_count": [1] * 12,
        }
    )
    sample = sample_documents(docs, "heldout", 2, seed=3)
    assert sample["label"].to_list() == ["a", "b", "a", "b"] and sample["round"].to_list() == [0, 0, 1, 1]
    assert set(sample["split"]) == {"heldout"} and sample["doc_id"].n_unique() == 4
    assert sample.equals(sample_documents(docs, "heldout", 2, seed=3))
    assert sample["doc"].to_list() == [int(d[1:]) for d in sample["doc_id"]]  # the store's document index
    with pytest.raises(ConfigError, match=r"atlas\.split"):
        sample_documents(docs.filter(pl.col("split") == "train"), "heldout", 1, 0)


def test_lens_readings_equal_the_direct_unembedding(case):
    meta, k = case.payload["meta"], SETTINGS.top_k
    assert meta["lenses"] == ["logit", "tuned"] and meta["lens_layers"]["tuned"] == [*TUNED_LAYERS, 3]
    for document in case.payload["documents"]:
        for index, layer in enumerate(meta["layers"]):
            direct = direct_readings(case, document, layer)
            model_top = np.argsort(-direct["model"], axis=1)[:, :k]
            assert document["model"]["ids"] == model_top.tolist()
            for name in ("logit", "tuned"):
                reading = document["lenses"][name]
                if layer not in meta["lens_layers"][name]:
                    assert reading["ids"][index] is None
                    continue
                top = np.argsort(-direct[name], axis=1)[:, :k]
                assert reading["ids"][index] == top.tolist()
                probs = np.exp(np.take_along_axis(direct[name], top, 1))
                np.testing.assert_allclose(reading["probs"][index], probs, atol=1e-4)
                kl = (np.exp(direct["model"]) * (direct["model"] - direct[name])).sum(1)
                np.testing.assert_allclose(reading["kl"][index], kl, atol=2e-4, rtol=1e-4)
                assert reading["agree"][index] == (top[:, 0] == model_top[:, 0]).astype(int).tolist()


def test_first_agreeing_layer_is_the_first_layer_whose_top1_is_the_final_one(case):
    layers = case.payload["meta"]["layers"]
    for document in case.payload["documents"]:
        for name, reading in document["lenses"].items():
            for token, first in enumerate(reading["first"]):
                agreeing = [
                    layer for i, layer in enumerate(layers) if reading["agree"][i] and reading["agree"][i][token]
                ]
                assert first == (agreeing[0] if agreeing else None), (name, token)
        # at the last layer the logit lens reads resid.L through the final norm: the model's own prediction
        assert all(document["lenses"]["logit"]["agree"][-1])


def test_norms_and_neighbours_equal_a_brute_force_pass_over_the_store(case):
    meta = case.payload["meta"]
    with ActivationStore(case.store_path) as store:
        keep = store.tokens()["pos"].to_numpy() > 0
        stored = {layer: np.linalg.norm(store.read(layer).astype(np.float64), axis=1) for layer in meta["layers"]}
    for index, layer in enumerate(meta["layers"]):
        typical = np.median(stored[layer][keep])
        assert meta["typical_norm"][index] == pytest.approx(typical, rel=1e-4)
        for document in case.payload["documents"]:
            rows = document["token_start"] + np.arange(len(document["ids"]))
            np.testing.assert_allclose(document["norm"][index], stored[layer][rows] / typical, atol=2e-3)
            found = document["neighbours"]
            check_neighbours(
                case.store_path, layer, rows, found["rows"][index], found["scores"][index], SETTINGS.neighbours_k
            )


def test_every_shown_id_and_neighbour_is_decodable_on_the_page(case):
    payload = case.payload
    with ActivationStore(case.store_path) as store:
        ids = store.tokens()["token_id"].to_numpy()
    for row, (doc, pos, context, offset) in payload["contexts"].items():
        assert context[offset] == ids[int(row)] and str(doc) in payload["store_docs"] and pos >= 1
        assert all(str(token) in payload["vocab"] for token in context)
    for document in payload["documents"]:
        assert document["ids"] == ids[document["token_start"] : document["token_start"] + len(document["ids"])].tolist()
        assert all(str(token) in payload["vocab"] for token in document["ids"])
        assert len(document["ids"]) == min(SETTINGS.max_tokens, document["token_count"])
    assert payload["vocab"][str(payload["documents"][0]["ids"][0])] == case.loaded.tokenizer.decode(
        [payload["documents"][0]["ids"][0]]
    )


def test_a_model_without_a_tuned_lens_shows_the_logit_lens_only(case):
    with ActivationStore(case.store_path) as store:
        payload = atlas_data(case.loaded, store, None, {}, SETTINGS)
    assert payload["meta"]["lenses"] == ["logit"] and set(payload["documents"][0]["lenses"]) == {"logit"}
    assert payload["documents"][0]["lenses"]["logit"] == case.payload["documents"][0]["lenses"]["logit"]
    assert "tuned" not in render_page(payload).split('id="atlas-data"')[0]


def test_layers_the_store_lacks_are_left_out_and_none_stored_is_a_config_error(case):
    with ActivationStore(case.store_path) as store:
        assert atlas_layers([1, 3], store) == [1, 3]
        store_layers = store.layers
    assert store_layers == [0, 1, 2, 3]
    fake = SimpleNamespace(attrs={"n_layers": 3}, layers=[0, 3], path="s.h5")
    assert atlas_layers({"every": 2}, fake) == [0, 3]
    with pytest.raises(ConfigError, match=r"atlas\.layers.*extraction\.layers"):
        atlas_layers([1, 2], fake)


def _embedded(page: str) -> dict:
    match = re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', page, re.DOTALL)
    assert match is not None
    return json.loads(match.group(1))


def test_the_page_is_self_contained_and_its_data_survive_hostile_token_text(case):
    payload = {**case.payload, "vocab": {**case.payload["vocab"]}}
    first = str(payload["documents"][0]["ids"][0])
    payload["vocab"][first] = "</script><script>alert(1)</script><!--"
    page = render_page(payload)
    assert page.count("</script>") == 2  # the data's and the page script's own: the token text cannot close them
    assert _embedded(page) == json.loads(json.dumps(payload))
    assert not re.search(r"""(src|href)\s*=|https?://|@import|fetch\(|XMLHttpRequest""", page)


def test_the_budget_drops_the_last_documents_and_cuts_the_tables_to_match(case, tmp_path):
    full = len(render_page(case.payload).encode())
    kept, page = within_budget(case.payload, full - 1)
    shown = kept["documents"]
    assert 0 < len(shown) < len(case.payload["documents"]) and len(page.encode()) <= full - 1
    assert [d["doc_id"] for d in shown] == [d["doc_id"] for d in case.payload["documents"][: len(shown)]]
    used = {str(row) for d in shown for layer in d["neighbours"]["rows"] for token in layer for row in token}
    assert set(kept["contexts"]) == used and set(kept["vocab"]) < set(case.payload["vocab"])
    with pytest.raises(LatentAtlasError, match=r"atlas\.max_bytes"):
        write_page(case.payload, tmp_path / "page.html", 1000)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_steered_continuations_stand_beside_the_unsteered_one():
    def table(method, coefficients, texts):
        n = len(coefficients)
        return pl.DataFrame(
            {
                "coefficient": coefficients,
                "decoding": ["greedy"] * n,
                "prompt_id": [0] * n,
                "prompt": ["I think"] * n,
                "sample": [0] * n,
                "continuation": texts,
                "sentiment": [0.5] * n,
                "layer": [6] * n,
                "method": [method] * n,
            }
        )

    runs = steering_runs(
        {"icv": table("icv", [0.0, 0.1], ["plain", "calm"]), "actadd": table("actadd", [0.0, 4.0], ["plain", "joy"])}
    )
    assert len(runs) == 1 and runs[0]["unsteered"] == "plain" and runs[0]["prompt"] == "I think"
    assert [(r["method"], r["coefficient"], r["continuation"]) for r in runs[0]["runs"]] == [
        ("actadd", 4.0, "joy"),
        ("icv", 0.1, "calm"),
    ]
    assert steering_runs({}) == []


def test_inputs_name_the_tuned_lens_and_steering_tables_only_where_those_ran():
    config = {
        "run": {"models": ["a", "b"]},
        "lenses": {"models": ["a"]},
        "steering": {"models": ["a"], "methods": ["actadd", "iti", "icv"]},
    }
    assert inputs(config, "a", "c") == {
        "manifest": "results/models/a/manifest.json",
        "store": "results/activations/a/c.h5",
        "tuned": "results/lenses/a/c.tuned-lens.pt",
        "steering_actadd": "results/steering/a/actadd.parquet",
        "steering_icv": "results/steering/a/icv.parquet",
    }
    assert set(inputs(config, "b", "c")) == {"manifest", "store"}
