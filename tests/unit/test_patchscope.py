"""Patchscopes: METHODS §10 check 5 (self-patching is a no-op), patching really moves the output, and the
identity patchscope's next-token evaluation (Precision@1, surprisal) against transformers' own logits."""

import polars as pl
import pytest
import torch

from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.lenses import Unembed
from latent_atlas.lenses.evaluate import evaluate_lenses, evaluation_tokens
from latent_atlas.lenses.patchscope import (
    IDENTITY_PROMPT,
    IdentityPatchscope,
    patch_residual,
    patchscope,
    residual_state,
)
from latent_atlas.store import ActivationStore
from tests.conftest import STORE_ATTRS, reference_states

PROMPT = "the dog saw the cat and the river"


def test_self_patching_is_a_no_op(tiny_loaded):
    encoded = tiny_loaded.tokenizer(PROMPT, return_tensors="pt")
    length = encoded["input_ids"].shape[1]
    with torch.no_grad():
        reference = tiny_loaded.model(**encoded).logits
        for layer in range(tiny_loaded.n_layers + 1):
            for position in (0, 3, -1):
                state = residual_state(tiny_loaded, PROMPT, layer, position)
                with patch_residual(tiny_loaded.parts, layer, position % length, state):
                    patched = tiny_loaded.model(**encoded).logits
                assert torch.equal(patched, reference), (layer, position)


def test_patching_changes_what_follows_and_only_from_the_position_on(tiny_loaded):
    encoded = tiny_loaded.tokenizer(PROMPT, return_tensors="pt")
    foreign = residual_state(tiny_loaded, "water light sound", 1, -1) * 5
    with torch.no_grad():
        reference = tiny_loaded.model(**encoded).logits
        with patch_residual(tiny_loaded.parts, 1, 4, foreign):
            patched = tiny_loaded.model(**encoded).logits
    assert torch.equal(patched[0, :4], reference[0, :4])  # causal: earlier positions untouched
    assert not torch.allclose(patched[0, 4:], reference[0, 4:])


def test_patchscope_reads_and_generates(tiny_loaded):
    encoded = tiny_loaded.tokenizer(IDENTITY_PROMPT, return_tensors="pt")
    with torch.no_grad():
        before = tiny_loaded.model(**encoded).logits
    state = residual_state(tiny_loaded, PROMPT, tiny_loaded.n_layers, -1) * 3
    reading = patchscope(tiny_loaded, state, tiny_loaded.n_layers, IDENTITY_PROMPT, max_new_tokens=5, k=3)
    assert len(reading.next_token_ids) == 3 and reading.next_token_probs == sorted(reading.next_token_probs)[::-1]
    assert isinstance(reading.generated, str)
    # the hooks are gone once the patchscope returns: the logits are those from before it ran
    with torch.no_grad():
        assert torch.equal(tiny_loaded.model(**encoded).logits, before)
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in tiny_loaded.parts.layers)


def test_identity_patchscope_into_its_own_run_has_precision_one(tiny_loaded):
    """METHODS §5 check (a): a state patched into the run it came from (same context, position and layer)
    changes nothing, so Precision@1 is 1 at every source layer and the logits are the model's own."""
    text = "the dog saw the cat and the river was old"
    ids = tiny_loaded.tokenizer(text, return_tensors="pt")["input_ids"][0]
    states, logits = reference_states(tiny_loaded, ids)
    for position in (1, 4, len(ids) - 1):
        context = " ".join(text.split()[: position + 1])
        scope = IdentityPatchscope(tiny_loaded, target_prompt=context, batch_size=2)
        assert torch.equal(scope.target_ids, ids[: position + 1])
        for layer in range(tiny_loaded.n_layers + 1):
            batch = torch.stack([states[layer][position]] * 3)
            patched = scope.logits(batch, layer)
            assert patched.shape == (3, logits.shape[-1])
            torch.testing.assert_close(patched, logits[position].expand(3, -1), atol=1e-4, rtol=1e-4)
            assert (patched.argmax(-1) == logits[position].argmax()).all(), (position, layer)  # Precision@1 = 1


def test_identity_patchscope_changes_what_it_reads(tiny_loaded):
    """Different states give different readings (the patch reaches the output) at every layer but none."""
    ids = tiny_loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"][0]
    states, _ = reference_states(tiny_loaded, ids)
    scope = IdentityPatchscope(tiny_loaded)
    for layer in range(tiny_loaded.n_layers + 1):
        patched = scope.logits(states[layer][[1, 4]], layer)
        assert not torch.allclose(patched[0], patched[1])


@pytest.fixture(scope="module")
def llama_store(tiny_model_dirs, tmp_path_factory):
    from latent_atlas.models import load_model
    from tests.unit.test_lenses import _random_corpus

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    path = tmp_path_factory.mktemp("patchscope") / "s.h5"
    extract_activations(
        loaded, _random_corpus(24), path, ExtractionSettings(dtype="float32", device="cpu"), STORE_ATTRS, False
    )
    return loaded, path


def test_precision_and_surprisal_at_the_last_layer(llama_store):
    """At resid.L the identity patchscope reads the state through the final norm and head alone, so its
    Precision@1 is 1 and its surprisal is -log max p of the model's own next-token distribution, which is
    computed here from transformers' logits of each held-out document."""
    loaded, path = llama_store
    unembed = Unembed.from_parts(loaded.parts)
    with ActivationStore(path) as store:
        tokens = evaluation_tokens(store, "heldout", None, skip_first_position=False)
        scope = IdentityPatchscope(loaded, batch_size=16)
        table = evaluate_lenses(store, unembed, {"patchscope_identity": scope}, [loaded.n_layers], tokens, 40)
        expected = []
        rows = set(tokens.rows.tolist())
        for doc_id in store.docs().filter(pl.col("split") == "heldout")["doc_id"]:
            doc_rows = store.doc_rows(doc_id)
            ids = store.tokens()["token_id"][doc_rows].to_list()
            with torch.no_grad():
                log_probs = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            kept = [i for i, row in enumerate(range(doc_rows.start, doc_rows.stop)) if row in rows]
            expected.extend((-log_probs[kept].max(-1).values).tolist())
    value = dict(zip(table["metric"], table["value"], strict=True))
    assert value["top1_agreement"] == 1.0
    assert value["surprisal"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert len(expected) == len(tokens.rows)
