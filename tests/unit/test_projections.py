"""Parameter projections: METHODS §10 check 3 (linearity, factorised = brute-force top-k, aligned > shuffled).

Expected values are computed here with numpy from the model's own weights (``lm_head`` / ``embed_tokens``) and
transformers' own hidden states and logits, never with the functions under test; an untied model (its
``lm_head`` is not ``embed_tokens``) runs every projection so that reading the wrong matrix shows.
"""

import numpy as np
import pytest
import torch

from latent_atlas.lenses.projections import (
    activation_recall,
    bilinear_top_k,
    circuit_factors,
    collect_recall_states,
    head_factors,
    mlp_token_ids,
    mlp_vectors,
    other_document_positions,
    pooled_recall,
    project_heads,
    project_mlp,
    recall_texts,
    vocabulary_scores,
)
from latent_atlas.models import load_model
from tests.conftest import SENTENCES, untied_llama


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


# --------------------------------------------------------------------------------------------------
# An untied model through every parameter projection


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tiny Llama whose ``lm_head`` is its own matrix (``tie_word_embeddings=False``), acquired and loaded."""
    return untied_llama(tmp_path_factory.mktemp("untied"), seed=3, intermediate_size=48, layers=2)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def _top_sets(scores: np.ndarray, k: int, largest: bool = True) -> list[set[int]]:
    order = np.argsort(-scores if largest else scores, axis=-1, kind="stable")[..., :k]
    return [set(row.tolist()) for row in order.reshape(-1, k)]


def test_untied_mlp_tokens_are_read_through_the_lm_head(untied):
    tokens, alignment = project_mlp(untied, [1, 2], k=4, overlap_k=10)
    w_u, w_e = _numpy(untied.model.lm_head.weight), _numpy(untied.model.model.embed_tokens.weight)
    differs, generator = 0, torch.Generator().manual_seed(0)  # project_mlp's seed: one permutation per block
    for layer in (1, 2):
        mlp = untied.model.model.layers[layer - 1].mlp
        matrices = {
            "key_gate": _numpy(mlp.gate_proj.weight),
            "key_up": _numpy(mlp.up_proj.weight),
            "value": _numpy(mlp.down_proj.weight).T,
        }
        for kind, matrix in matrices.items():
            for direction, largest in (("top", True), ("bottom", False)):
                rows = tokens.filter(
                    (tokens["layer"] == layer) & (tokens["kind"] == kind) & (tokens["direction"] == direction)
                ).sort(["neuron", "rank"])
                got = [set(ids) for ids in np.asarray(rows["token_id"]).reshape(-1, 4).tolist()]
                assert got == _top_sets(matrix @ w_u.T, 4, largest)
                differs += sum(a != b for a, b in zip(got, _top_sets(matrix @ w_e.T, 4, largest), strict=True))
        tops = {kind: _top_sets(matrix @ w_u.T, 10) for kind, matrix in matrices.items()}
        permutation = torch.randperm(48, generator=generator).numpy()
        for key in ("key_gate", "key_up"):
            row = alignment.filter((alignment["layer"] == layer) & (alignment["pair"] == f"{key}/value"))
            aligned = np.mean([len(a & b) / len(a | b) for a, b in zip(tops[key], tops["value"], strict=True)])
            shuffled = np.mean(
                [
                    len(a & tops["value"][j]) / len(a | tops["value"][j])
                    for a, j in zip(tops[key], permutation, strict=True)
                ]
            )
            assert row["aligned"][0] == pytest.approx(aligned) and row["shuffled"][0] == pytest.approx(shuffled)
    assert differs > 0  # reading embed_tokens instead would have been caught


def test_untied_head_circuits_are_read_through_the_lm_head(untied):
    table = project_heads(untied, [1, 2], k=6)
    w_u = _numpy(untied.model.lm_head.weight)
    config = untied.model.config
    head_dim, group = config.hidden_size // config.num_attention_heads, 2  # 4 query heads share 2 KV heads
    for layer in (1, 2):
        attention = untied.model.model.layers[layer - 1].self_attn
        q, k, v, o = (_numpy(getattr(attention, f"{n}_proj").weight) for n in "qkvo")
        for head in range(config.num_attention_heads):
            rows, kv_rows = (
                slice(head * head_dim, (head + 1) * head_dim),
                slice((head // group) * head_dim, (head // group + 1) * head_dim),
            )
            # E^T W E with E = W_U^T, in x @ W layout: W_V = v_proj.weight[rows].T, W_O = o_proj.weight[:, rows].T
            forms = {
                "OV": w_u @ v[kv_rows].T @ o[:, rows].T @ w_u.T,
                "QK": w_u @ q[rows].T @ k[kv_rows] @ w_u.T,
            }
            for circuit, full in forms.items():
                got = table.filter(
                    (table["layer"] == layer) & (table["head"] == head) & (table["circuit"] == circuit)
                ).sort("rank")
                flat = np.argsort(-full.reshape(-1), kind="stable")[:6]
                assert list(zip(got["source_id"], got["target_id"], strict=True)) == [
                    (int(i), int(j)) for i, j in zip(*np.unravel_index(flat, full.shape), strict=True)
                ]
                np.testing.assert_allclose(got["score"], full.reshape(-1)[flat], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Dar et al.'s aligned-vs-shuffled recall of a state's projection by its activated neurons


def _rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * gain


def _expected_inputs(loaded, texts: list[str], positions: int) -> dict:
    """Per position, from transformers' own outputs: MLP activations (numpy from the MLP's input and its gate
    and up weights), block outputs x^l (``hidden_states``), the model's logits, and the document index."""
    model, L = loaded.model, loaded.n_layers
    mlp_inputs: dict[int, list[np.ndarray]] = {layer: [] for layer in range(1, L + 1)}
    handles = [
        model.model.layers[layer - 1].mlp.register_forward_pre_hook(
            lambda _m, args, layer=layer: mlp_inputs[layer].append(_numpy(args[0][0]))
        )
        for layer in range(1, L + 1)
    ]
    hidden: dict[int, list[np.ndarray]] = {layer: [] for layer in range(1, L + 1)}
    logits, documents = [], []
    try:
        for index, text in enumerate(texts):
            ids = loaded.tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model(input_ids=ids, output_hidden_states=True)
            for layer in range(1, L + 1):
                hidden[layer].append(_numpy(out.hidden_states[layer][0]))
            logits.append(_numpy(out.logits[0]))
            documents += [index] * ids.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    gain, eps = _numpy(model.model.norm.weight), model.config.rms_norm_eps
    result: dict = {"logits": np.concatenate(logits)[:positions], "documents": np.array(documents[:positions])}
    for layer in range(1, L + 1):
        mlp = model.model.layers[layer - 1].mlp
        x = np.concatenate(mlp_inputs[layer])[:positions]
        gate, up = x @ _numpy(mlp.gate_proj.weight).T, x @ _numpy(mlp.up_proj.weight).T
        result[f"activations{layer}"] = gate / (1 + np.exp(-gate)) * up
        h = np.concatenate(hidden[layer])[:positions]  # hidden_states[L] is already the final norm's output
        result[f"state{layer}"] = (h if layer == L else _rms_norm(h, gain, eps)) @ _numpy(model.lm_head.weight).T
    return result


def _expected_recall(neuron_scores: np.ndarray, active: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    tops, wanted = _top_sets(neuron_scores, k), _top_sets(target, k)
    return np.array(
        [len(set().union(*(tops[i] for i in row)) & b) / len(b) for row, b in zip(active, wanted, strict=True)]
    )


def test_recall_equals_a_numpy_recomputation_on_an_untied_model(untied):
    texts, positions, neurons, k, seed = SENTENCES[:6], 40, 3, 4, 5
    states = collect_recall_states(untied, texts, [1, 2], positions, max_length=64)
    table = activation_recall(untied, states, mlp_token_ids(untied, [1, 2], k), neurons, k, seed)
    expected = _expected_inputs(untied, texts, positions)
    assert np.array_equal(states.documents.numpy(), expected["documents"])
    donors = other_document_positions(states.documents, torch.Generator().manual_seed(seed)).numpy()
    w_u = _numpy(untied.model.lm_head.weight)
    assert table.height == 2 * 2 * 3 and set(table["positions"]) == {positions}
    assert set(table["documents"]) == {len(set(expected["documents"].tolist()))}
    for layer in (1, 2):
        mlp = untied.model.model.layers[layer - 1].mlp
        active = np.argsort(-expected[f"activations{layer}"], axis=-1, kind="stable")[:, :neurons]
        matrices = {
            "key_gate": _numpy(mlp.gate_proj.weight),
            "key_up": _numpy(mlp.up_proj.weight),
            "value": _numpy(mlp.down_proj.weight).T,
        }
        for target, scores in (("layer", expected[f"state{layer}"]), ("final", expected["logits"])):
            for kind, matrix in matrices.items():
                row = table.filter((table["layer"] == layer) & (table["target"] == target) & (table["kind"] == kind))
                aligned = _expected_recall(matrix @ w_u.T, active, scores, k)
                shuffled = _expected_recall(matrix @ w_u.T, active[donors], scores, k)
                assert row["aligned"][0] == pytest.approx(aligned.mean())
                assert row["shuffled"][0] == pytest.approx(shuffled.mean())
                assert row["difference"][0] == pytest.approx(aligned.mean() - shuffled.mean())
                assert row["unit"][0] == "document" and row["n"][0] == len(set(expected["documents"].tolist()))


def test_shuffled_positions_come_from_other_documents():
    documents = torch.tensor([0] * 5 + [1] * 2 + [2] * 9)
    donors = torch.stack([other_document_positions(documents, torch.Generator().manual_seed(s)) for s in range(400)])
    assert (documents[donors] != documents).all()
    counts = torch.bincount(donors[:, 0], minlength=16)  # position 0 (document 0) draws from the 11 others
    assert (counts[:5] == 0).all() and (counts[5:] > 0).all() and counts[5:].max() < 3 * counts[5:].min()
    with pytest.raises(ValueError, match="two documents"):
        other_document_positions(torch.zeros(4, dtype=torch.long), torch.Generator())


def test_pooled_recall_on_a_hand_made_case():
    neuron_ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    active = torch.tensor([[0, 1], [2, 2]])
    target = torch.tensor([[2, 3, 9], [6, 7, 8]])
    assert pooled_recall(neuron_ids, active, target).tolist() == pytest.approx([2 / 3, 1 / 3])


def test_aligned_beats_shuffled_when_values_write_their_own_keys_tokens(tiny_model_dirs):
    """Planted: neuron t's gate and up keys are token t's embedding and its value writes token t (a row of
    W_U), attention writes nothing; a position's own neurons then recall its projection, another's do not."""
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    block = loaded.parts.layers[0]
    vocab = loaded.parts.lm_head.weight.shape[0]
    with torch.no_grad():
        embedding = loaded.parts.embed.weight
        unit = embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # the padding row is zero
        for matrix in (block.mlp.gate_proj.weight, block.mlp.up_proj.weight):
            matrix.zero_()
            matrix[:vocab] = 4 * unit / block.post_attention_layernorm.weight
        block.mlp.down_proj.weight.zero_()
        block.mlp.down_proj.weight[:, :vocab] = 10 * loaded.parts.lm_head.weight.T
        block.self_attn.o_proj.weight.zero_()
    texts = recall_texts_from(SENTENCES)
    states = collect_recall_states(loaded, texts, [1], positions=60, max_length=64)
    table = activation_recall(loaded, states, mlp_token_ids(loaded, [1], 1), neurons=3, k=1)
    value = table.filter((table["target"] == "layer") & (table["kind"] == "value"))
    assert value["aligned"][0] > 0.9 and value["shuffled"][0] < 0.3


def recall_texts_from(sentences: list[str]) -> list[str]:
    import polars as pl

    corpus = pl.DataFrame({"text": sentences, "split": ["heldout"] * len(sentences)})
    texts = recall_texts(corpus, "heldout", seed=1)
    assert sorted(texts) == sorted(sentences) and texts != sentences  # every document, in a seeded order
    return texts
