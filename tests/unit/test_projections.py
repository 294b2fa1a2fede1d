"""Parameter projections: METHODS §10 check 3 (linearity, factorised = brute-force top-k, aligned > shuffled)."""

import pytest
import torch

from latent_atlas.lenses.projections import (
    bilinear_top_k,
    circuit_factors,
    head_factors,
    mlp_vectors,
    project_heads,
    project_mlp,
    vocabulary_scores,
)
from latent_atlas.models import load_model


@pytest.fixture
def llama(tiny_model_dirs):
    return load_model(tiny_model_dirs["llama"], device="cpu")


def test_projection_is_linear(llama):
    w_u = llama.parts.lm_head.weight.detach()
    a, b = torch.randn(2, llama.d_model)
    torch.testing.assert_close(
        vocabulary_scores(2 * a - 3 * b, w_u),
        2 * vocabulary_scores(a, w_u) - 3 * vocabulary_scores(b, w_u),
        atol=1e-4,
        rtol=1e-5,
    )


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_mlp_is_the_sum_of_its_value_vectors_weighted_by_key_activations(tiny_model_dirs, arch):
    loaded = load_model(tiny_model_dirs[arch], device="cpu")
    block = loaded.parts.layers[0]
    vectors = mlp_vectors(block)
    x = torch.randn(5, loaded.d_model)
    with torch.no_grad():
        if "key_gate" in vectors.keys:
            activation = block.mlp.act_fn(x @ vectors.keys["key_gate"].T) * (x @ vectors.keys["key_up"].T)
        else:
            activation = block.mlp.act(x @ vectors.keys["key"].T + block.mlp.c_fc.bias)
        expected = block.mlp(x) - (block.mlp.c_proj.bias if arch == "gpt2" else 0)
        torch.testing.assert_close(activation @ vectors.values, expected, atol=1e-5, rtol=1e-4)


def test_head_factors_reconstruct_the_value_path(llama):
    config = llama.model.config
    attention = llama.parts.layers[0].self_attn
    heads = head_factors(llama.parts.layers[0], config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    x = torch.randn(4, llama.d_model)
    with torch.no_grad():
        values = attention.v_proj(x).view(4, config.num_key_value_heads, config.head_dim)
        repeated = values.repeat_interleave(config.num_attention_heads // config.num_key_value_heads, dim=1)
        expected = attention.o_proj(repeated.reshape(4, -1))  # every head attending only to its own token
        summed = sum(x @ heads.value[h] @ heads.output[h] for h in range(config.num_attention_heads))
    torch.testing.assert_close(summed, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
def test_factorised_top_k_equals_brute_force(llama, block_rows):
    config = llama.model.config
    heads = head_factors(llama.parts.layers[1], config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    for left, right in circuit_factors(heads, 2, llama.parts.lm_head.weight.detach()).values():
        scores, rows, cols = bilinear_top_k(left, right, k=25, block_rows=block_rows)
        full = left @ right
        expected_scores, flat = full.reshape(-1).topk(25)
        torch.testing.assert_close(scores, expected_scores)
        torch.testing.assert_close(full[rows, cols], scores)
        assert set(flat.tolist()) == set((rows * full.shape[1] + cols).tolist())


def test_project_heads_on_a_sub_vocabulary(llama):
    vocabulary = torch.tensor([5, 9, 11, 20, 33, 40])
    table = project_heads(llama, [1, 2], k=4, vocabulary=vocabulary)
    assert table.height == 2 * config_heads(llama) * 2 * 4
    assert set(table["source_id"]) <= set(vocabulary.tolist()) and set(table["target_id"]) <= set(vocabulary.tolist())
    first = table.filter((table["layer"] == 1) & (table["head"] == 0) & (table["circuit"] == "OV"))
    assert first["score"].to_list() == sorted(first["score"].to_list(), reverse=True)


def config_heads(loaded) -> int:
    return loaded.model.config.num_attention_heads


def test_aligned_beats_shuffled_when_values_copy_keys(llama):
    block = llama.parts.layers[0]
    with torch.no_grad():
        block.mlp.down_proj.weight.copy_(block.mlp.gate_proj.weight.T)  # value i = gate key i
    tokens, alignment = project_mlp(llama, [1, 2], k=3, overlap_k=8)
    first = alignment.filter((alignment["layer"] == 1) & (alignment["pair"] == "key_gate/value"))
    assert first["aligned"][0] == 1.0 and first["shuffled"][0] < 0.5
    assert set(tokens["kind"]) == {"key_gate", "key_up", "value"} and set(tokens["direction"]) == {"top", "bottom"}
    assert tokens.height == 2 * 3 * 2 * 3 * block.mlp.gate_proj.weight.shape[0]
