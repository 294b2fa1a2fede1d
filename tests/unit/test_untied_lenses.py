"""An untied model (``tie_word_embeddings=False``) through every lens and the lens pipeline.

Every shared tiny model ties its head to its embedding, so a lens that read the wrong matrix would pass
there. Here W_U and W_E differ, and each lens is checked against transformers' own outputs or against
``torch.linalg.pinv`` of the matrix it must read.
"""

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.lenses import LogitLens, TunedLens, Unembed
from latent_atlas.lenses.patchscope import IdentityPatchscope
from latent_atlas.lenses.pipeline import build_lenses, evaluate_lenses_on_store, train_tuned_lens_on_store
from latent_atlas.plots.lenses import plot_lens_comparison
from latent_atlas.testing import _WORDS
from tests.conftest import STORE_ATTRS, reference_states, untied_llama

TEXT = "the dog saw the cat and the river was old"


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tiny Llama with its own LM head, acquired and loaded like any configured model."""
    return untied_llama(tmp_path_factory.mktemp("untied-lenses"), seed=5, intermediate_size=64, layers=3)


def _run(loaded) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Token ids, transformers' states of every residual layer (raw last-block output by a hook), logits."""
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    states, logits = reference_states(loaded, ids)
    return ids, states, logits


def test_logit_and_untrained_tuned_lens_at_the_last_layer_are_the_model(untied):
    _, states, logits = _run(untied)
    unembed = Unembed.from_parts(untied.parts)
    with torch.no_grad():
        torch.testing.assert_close(LogitLens(unembed).logits(states[-1], untied.n_layers), logits, atol=1e-5, rtol=0)
        tuned = TunedLens(unembed, untied.n_layers, untied.d_model)
        torch.testing.assert_close(tuned.logits(states[-1], untied.n_layers), logits, atol=1e-5, rtol=0)
        for layer in range(untied.n_layers):
            assert torch.equal(tuned.logits(states[layer], layer), LogitLens(unembed).logits(states[layer], layer))


def test_semantic_bases_come_from_the_head_and_inverse_embedding_from_the_embedding(untied):
    lenses = build_lenses(untied, {}, None)
    head = untied.model.get_output_embeddings().weight.detach().double()  # W_U (V, d)
    embedding = untied.model.get_input_embeddings().weight.detach().double()  # W_E (V, d)
    torch.testing.assert_close(lenses["semantic_basis"].bases, torch.linalg.pinv(head.T), atol=1e-8, rtol=0)
    assert not torch.allclose(lenses["semantic_basis"].bases, torch.linalg.pinv(embedding.T), atol=1e-3)
    pinv = lenses["inverse_embedding_pinv"].reader.double()  # (d, V)
    torch.testing.assert_close(pinv, torch.linalg.pinv(embedding), atol=1e-5, rtol=0)
    h = torch.randn(4, untied.d_model)
    rescaled = h.double() / h.double().norm(dim=-1, keepdim=True) * embedding.norm(dim=-1).mean()
    torch.testing.assert_close(
        lenses["inverse_embedding_transpose"].logits(h, 1).double(), rescaled @ embedding.T, atol=1e-4, rtol=1e-5
    )
    # cosine readings of the normed state against the head's bases
    with torch.no_grad():
        normed = untied.parts.final_norm(h).double()
    bases = torch.linalg.pinv(head.T)
    cosines = (normed / normed.norm(dim=-1, keepdim=True)) @ (bases / bases.norm(dim=-1, keepdim=True)).T
    torch.testing.assert_close(lenses["semantic_basis"].logits(h, 1).double(), cosines / 0.05, atol=1e-4, rtol=0)


def test_identity_patchscope_into_its_own_run_has_precision_one(untied):
    ids, states, logits = _run(untied)
    position = 5
    scope = IdentityPatchscope(untied, target_prompt=" ".join(TEXT.split()[: position + 1]))
    assert torch.equal(scope.target_ids, ids[: position + 1])
    for layer in range(untied.n_layers + 1):
        patched = scope.logits(states[layer][position], layer)
        torch.testing.assert_close(patched, logits[position], atol=1e-4, rtol=1e-4)
        assert patched.argmax() == logits[position].argmax()


def test_lens_pipeline_on_an_untied_model(untied, tmp_path):
    """Train, fit temperatures, evaluate every lens and the patchscope; check the last layer exactly."""
    rng = np.random.default_rng(0)
    corpus = pl.DataFrame(
        {
            "doc_id": [f"r{i}" for i in range(24)],
            "text": [" ".join(rng.choice(_WORDS, size=16)) for _ in range(24)],
            "label": ["x"] * 24,
            "split": ["heldout" if i % 4 == 0 else "train" for i in range(24)],
            "source": ["test"] * 24,
        }
    )
    store = tmp_path / "s.h5"
    extract_activations(untied, corpus, store, ExtractionSettings(dtype="float32", device="cpu"), STORE_ATTRS, False)
    settings = {"layers": "all", "max_tokens": 60, "tuned": {"steps": 5, "tokens_per_step": 32}}
    train_tuned_lens_on_store(untied, store, tmp_path / "t.pt", settings)
    table = evaluate_lenses_on_store(untied, store, tmp_path / "t.pt", settings)
    readers = {"logit", "tuned", "patchscope_identity", "semantic_basis", "inverse_embedding_transpose",
               "inverse_embedding_pinv"}  # fmt: skip
    assert set(table["lens"]) == readers
    fitted = table.filter(pl.col("temperature").is_not_null())
    assert set(fitted["lens"]) == {"semantic_basis", "inverse_embedding_transpose", "inverse_embedding_pinv"}
    assert sorted(set(fitted["layer"])) == list(range(untied.n_layers + 1)) and (fitted["temperature"] > 0).all()
    assert fitted.group_by("lens", "layer").agg(pl.col("temperature").n_unique())["temperature"].to_list() == [1] * 12
    assert set(table["split"]) == {"heldout"}
    last = table.filter(pl.col("layer") == untied.n_layers)
    value = {(lens, metric): v for lens, metric, v in zip(last["lens"], last["metric"], last["value"], strict=True)}
    for reader in ("logit", "tuned", "patchscope_identity"):
        assert value[(reader, "kl_to_final")] < 1e-9 and value[(reader, "top1_agreement")] == 1.0, reader
    assert table.filter(pl.col("metric") == "top1_agreement", pl.col("lens") == "patchscope_identity").height == 4
    plot_lens_comparison(table, tmp_path / "c.pdf", tmp_path / "c.png", "untied")
    assert (tmp_path / "c.png").stat().st_size > 0
