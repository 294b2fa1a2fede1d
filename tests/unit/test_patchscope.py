"""Patchscopes: METHODS §10 check 5 (self-patching is a no-op) and patching really moves the output."""

import torch

from latent_atlas.lenses.patchscope import IDENTITY_PROMPT, patch_residual, patchscope, residual_state

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
    state = residual_state(tiny_loaded, PROMPT, tiny_loaded.n_layers, -1)
    reading = patchscope(tiny_loaded, state, tiny_loaded.n_layers, IDENTITY_PROMPT, max_new_tokens=5, k=3)
    assert len(reading.next_token_ids) == 3 and reading.next_token_probs == sorted(reading.next_token_probs)[::-1]
    assert isinstance(reading.generated, str)
    # hooks are removed afterwards: the model is unpatched again
    encoded = tiny_loaded.tokenizer(IDENTITY_PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(tiny_loaded.model(**encoded).logits, tiny_loaded.model(**encoded).logits)
        assert len(tiny_loaded.parts.layers[-1]._forward_hooks) == 0
