"""Steering vectors and the sentiment scorer against independent computations (METHODS §7.1-7.3).

Expected values come from transformers' own ``output_hidden_states`` (or a plain forward hook on the HF block
where ``hidden_states`` holds the final norm's output instead of the last block's), numpy's SVD, and the
published VADER examples; never from the code under test.
"""

import numpy as np
import pytest
import torch

from latent_atlas.errors import ConfigError
from latent_atlas.steering.interventions import ResidualAddition
from latent_atlas.steering.vectors import (
    actadd_vector,
    encode_after,
    icv_vectors,
    mean_difference_vector,
    prefix_tokens,
    start_token,
)
from latent_atlas.testing import tiny_tokenizer

BOS, PAD = "<bos>", "<pad>"  # the tiny tokenizer's tokens; it adds no BOS of its own, like SmolLM2's


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _hidden(loaded, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """transformers' hidden states of one sequence, each ``(T, d)``."""
    with torch.no_grad():
        output = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return tuple(states[0] for states in output.hidden_states)


def _hf_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _block_outputs(loaded, ids: list[int]) -> list[torch.Tensor]:
    """Embedding output and every block's raw output, ``(T, d)`` each, by plain hooks on the HF blocks."""
    outputs: list[torch.Tensor] = []
    blocks = _hf_blocks(loaded.model)
    handles = [
        block.register_forward_hook(lambda m, a, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0]))
        for block in blocks
    ]
    try:
        embedding = _hidden(loaded, ids)[0]
    finally:
        for handle in handles:
            handle.remove()
    return [embedding, *outputs]


def test_the_prefix_is_the_bos_the_tokenizer_adds_else_the_document_token():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tiny = tiny_tokenizer()
    assert tiny("the dog")["input_ids"] == _ids(tiny, "the dog")  # it adds nothing
    assert prefix_tokens(tiny, "auto") == [tiny.convert_tokens_to_ids(BOS)]  # no <|endoftext|>: its BOS
    assert prefix_tokens(tiny, "none") == [] and prefix_tokens(tiny, None) == []
    assert prefix_tokens(tiny, "the dog") == _ids(tiny, "the dog")
    with pytest.raises(ConfigError, match=r"steering\.prefix"):
        prefix_tokens(tiny, "   ")

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3, "<s>": 4, "the": 5, "dog": 6}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # SmolLM2's layout: declared BOS/EOS are chat tokens, nothing added, <|endoftext|> is the document separator
    chat = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    chat.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert prefix_tokens(chat, "auto") == [1]
    assert prefix_tokens(chat, "<|endoftext|>") == [1]  # a special token spelled out is one token
    assert start_token(chat, [1]) == 2 and start_token(chat, []) == 2  # the declared BOS
    # a tokenizer that adds its BOS itself: that BOS, whatever else the vocabulary has
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    adding = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>")
    assert adding("the dog")["input_ids"] == [4, 5, 6]
    assert prefix_tokens(adding, "auto") == [4]
    assert encode_after(adding, "the dog", [4]) == adding("the dog")["input_ids"]
    assert start_token(adding, [4]) == 3  # not a second BOS


@pytest.mark.parametrize("layer", [1, 2])
def test_actadd_rows_are_differences_of_the_prefixed_prompts_hidden_states(tiny_loaded, layer):
    tokenizer = tiny_loaded.tokenizer
    bos, pad = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(PAD)
    positive, negative = "a small red house", "the big dog"  # 4 and 3 tokens ("big" is <unk>)
    prefix = prefix_tokens(tokenizer, "auto")
    assert prefix == [bos]
    vector = actadd_vector(tiny_loaded, positive, negative, layer, prefix)
    plus = [bos, *_ids(tokenizer, positive)]
    minus = [bos, *_ids(tokenizer, negative), pad]  # the tiny vocabulary has no space token: padded with <pad>
    expected = _hidden(tiny_loaded, plus)[layer] - _hidden(tiny_loaded, minus)[layer]
    assert torch.equal(expected[0], torch.zeros_like(expected[0]))  # the shared prefix row is 0, hence dropped
    assert vector.shape == (4, tiny_loaded.d_model)
    torch.testing.assert_close(vector, expected[1:], atol=1e-5, rtol=1e-5)
    unprefixed = actadd_vector(tiny_loaded, positive, negative, layer)  # prefix none: from position 0
    expected = _hidden(tiny_loaded, plus[1:])[layer] - _hidden(tiny_loaded, minus[1:])[layer]
    torch.testing.assert_close(unprefixed, expected, atol=1e-5, rtol=1e-5)


def test_actadd_edits_only_the_positions_after_the_prefix(tiny_loaded):
    tokenizer, layer, coefficient = tiny_loaded.tokenizer, 1, 3.0
    prefix = prefix_tokens(tokenizer, "auto")
    vector = actadd_vector(tiny_loaded, "a small red house", "the big dog", layer, prefix)
    user = encode_after(tokenizer, "the dog saw a cat and the river", prefix)
    assert user[0] == tokenizer.convert_tokens_to_ids(BOS) and len(user) == 9
    addition = ResidualAddition(layer, vector, [coefficient], "front", start=len(prefix))
    seen: list[torch.Tensor] = []  # what block layer + 1 reads, observed after the edit
    with addition.attach(tiny_loaded.parts):
        handle = _hf_blocks(tiny_loaded.model)[layer - 1].register_forward_hook(
            lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0])
        )
        try:
            steered = _hidden(tiny_loaded, user)
        finally:
            handle.remove()
    unsteered = _hidden(tiny_loaded, user)
    change = seen[0] - unsteered[layer]
    assert torch.equal(change[0], torch.zeros_like(change[0]))  # the prefix (the attention sink) is untouched
    torch.testing.assert_close(change[1:5], coefficient * vector, atol=1e-5, rtol=1e-5)
    assert torch.equal(change[5:], torch.zeros_like(change[5:]))  # only T_s positions after the prefix
    for states, reference in zip(steered, unsteered, strict=True):
        assert torch.equal(states[0], reference[0])  # position 0 is the unsteered model's at every layer
    assert not torch.allclose(steered[-1][1:], unsteered[-1][1:])
    norms = addition.change_norms(tiny_loaded.parts)[layer]  # relative_norm's numerator: the edited positions
    torch.testing.assert_close(norms, change[1:5].norm(dim=-1).mean().reshape(1), atol=1e-4, rtol=1e-5)


def test_mean_difference_is_the_mean_last_token_difference_of_hidden_states(tiny_loaded):
    pairs = [["the dog saw a cat", "the cat saw a dog"], ["a red house", "a blue house by the river"]]
    layer = 2
    expected = torch.stack(
        [
            _hidden(tiny_loaded, tiny_loaded.tokenizer(a)["input_ids"])[layer][-1]
            - _hidden(tiny_loaded, tiny_loaded.tokenizer(b)["input_ids"])[layer][-1]
            for a, b in pairs
        ]
    ).mean(0)
    torch.testing.assert_close(mean_difference_vector(tiny_loaded, pairs, layer), expected, atol=1e-5, rtol=1e-5)
    prefix = prefix_tokens(tiny_loaded.tokenizer, "auto")  # as the sweep reads it: each text after the prefix
    after = torch.stack(
        [
            _hidden(tiny_loaded, encode_after(tiny_loaded.tokenizer, a, prefix))[layer][-1]
            - _hidden(tiny_loaded, encode_after(tiny_loaded.tokenizer, b, prefix))[layer][-1]
            for a, b in pairs
        ]
    ).mean(0)
    torch.testing.assert_close(mean_difference_vector(tiny_loaded, pairs, layer, prefix), after, atol=1e-5, rtol=1e-5)


def _numpy_icv(loaded, demonstrations) -> tuple[np.ndarray, np.ndarray]:
    """Liu et al.'s code in numpy: PCA of ΔH over the embedding and every block, svd_flip sign, entry 0 dropped."""
    rows = []
    for source, target in demonstrations:
        h_x = _block_outputs(loaded, loaded.tokenizer(source)["input_ids"])
        h_y = _block_outputs(loaded, loaded.tokenizer(target)["input_ids"])
        rows.append(np.concatenate([(y[-1] - x[-1]).double().numpy() for x, y in zip(h_x, h_y, strict=True)]))
    differences = np.stack(rows)
    mean = differences.mean(0)
    u, _, vt = np.linalg.svd(differences - mean, full_matrices=False)
    direction = vt[0] * np.sign(u[np.argmax(np.abs(u[:, 0])), 0])
    shape = (loaded.n_layers + 1, loaded.d_model)
    return (direction + mean).reshape(shape)[1:], direction.reshape(shape)[1:]


def test_icv_is_the_first_principal_direction_plus_the_mean_as_numpy_computes_it(tiny_loaded):
    demonstrations = [
        ["the dog saw a cat", "the dog saw a red house"],
        ["one day the water was blue", "one day the light was green"],
        ["they went to the city", "we came from the river"],
        ["a small house", "a large old house"],
    ]
    with_mean, direction = _numpy_icv(tiny_loaded, demonstrations)
    np.testing.assert_allclose(icv_vectors(tiny_loaded, demonstrations).numpy(), with_mean, atol=1e-5, rtol=1e-4)
    pure = icv_vectors(tiny_loaded, demonstrations, variant="pca").double().numpy()
    np.testing.assert_allclose(pure, direction, atol=1e-5, rtol=1e-4)  # the sign too, not only up to sign
    # the direction is unit over (L+1)·d with the embedding entry, so the blocks' part has norm below 1
    assert 0 < np.linalg.norm(pure) < 1


@pytest.mark.parametrize(
    ("text", "compound"),
    [
        ("VADER is smart, handsome, and funny.", 0.8316),  # vaderSentiment's README examples
        ("VADER is not smart, handsome, nor funny.", -0.7424),
        ("The book was kind of good.", 0.3832),
        ("A really bad, horrible book.", -0.8211),
        ("The train leaves at noon.", 0.0),
    ],
)
def test_the_sentiment_score_is_vader_compound_with_the_right_sign(text, compound):
    from latent_atlas.steering.pipeline import _Sentiment

    assert _Sentiment()(text) == pytest.approx(compound, abs=1e-4)


def test_an_optimised_vector_after_the_prefix_decodes_its_target_by_hand(tiny_model_dirs):
    from latent_atlas.models import load_model
    from latent_atlas.steering.vectors import optimise_vector

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    with torch.no_grad():  # initialisation scale 0.02 makes outputs almost input-blind; 0.3 does not
        for parameter in loaded.model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(15)
    tokenizer, layer = loaded.tokenizer, 1
    prefix = prefix_tokens(tokenizer, "auto")
    result = optimise_vector(loaded, "the dog saw a red house", layer, steps=300, learning_rate=0.3, prefix=prefix)
    target = _ids(tokenizer, "the dog saw a red house")
    assert result.exact and result.recovered == target, (result.steps, result.losses[-1])
    # greedy decoding by hand: <bos> unedited, then <eos> (the start token unlike the prefix), z from there on
    ids = [tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids("<eos>")]

    def add_after_prefix(module, args, output):
        states = output[0] if isinstance(output, tuple) else output
        edited = states.clone()
        edited[:, 1:] += result.vector
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = _hf_blocks(loaded.model)[layer - 1].register_forward_hook(add_after_prefix)
    try:
        with torch.no_grad():
            for _ in target:
                ids.append(int(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        handle.remove()
    assert ids[2:] == target
