"""Probes: resolving points from config, reading them with every lens and patchscope, and the CLI."""

import json

import numpy as np
import pytest
import torch

from latent_atlas.cli import main
from latent_atlas.errors import ConfigError
from latent_atlas.lenses.pipeline import read_probe
from latent_atlas.lenses.probe import is_readable, probe_vector
from latent_atlas.models import load_model


@pytest.fixture
def llama(tiny_model_dirs):
    return load_model(tiny_model_dirs["llama"], device="cpu")


def test_probe_vectors(llama, tmp_path):
    saved = tmp_path / "v.npy"
    np.save(saved, np.arange(llama.d_model, dtype=np.float32))
    probes = {
        "a": {"text": "the dog saw", "layer": 1},
        "b": {"text": "the cat", "layer": 1, "position": 0},
        "mid": {"midpoint": ["a", "b"]},
        "last": {"text": "the dog saw", "layer": 3},
        "saved": {"vector": str(saved), "layer": 2},
    }
    dog, cat = _hidden_states(llama, "the dog saw"), _hidden_states(llama, "the cat")  # transformers' own states
    a, layer = probe_vector(llama, "a", probes)
    assert layer == 1
    torch.testing.assert_close(a, dog[1][0, -1], atol=1e-6, rtol=1e-6)
    b, _ = probe_vector(llama, "b", probes)
    torch.testing.assert_close(b, cat[1][0, 0], atol=1e-6, rtol=1e-6)
    mid, layer = probe_vector(llama, "mid", probes)
    assert layer == 1
    torch.testing.assert_close(mid, (dog[1][0, -1] + cat[1][0, 0]) / 2, atol=1e-6, rtol=1e-6)
    last, layer = probe_vector(llama, "last", probes)  # resid.L is the raw last-block output: hidden_states[L]
    with torch.no_grad():  # is already normed (METHODS §0.2), so the final norm of the probe must give it back
        torch.testing.assert_close(llama.model.model.norm(last), dog[3][0, -1], atol=1e-5, rtol=1e-5)
    assert layer == 3 and not torch.allclose(last, dog[3][0, -1], atol=1e-3)
    vector, layer = probe_vector(llama, "saved", probes)
    assert layer == 2 and torch.equal(vector, torch.arange(llama.d_model, dtype=torch.float32))


def _hidden_states(loaded, text: str) -> tuple[torch.Tensor, ...]:
    """transformers' ``output_hidden_states`` for a text (``[l]`` is resid.l for l < L, post-norm at L)."""
    with torch.no_grad():
        return loaded.model(**loaded.tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ({"x": {"midpoint": ["a", "b"]}, "a": {"text": "the", "layer": 1}, "b": {"text": "a", "layer": 2}},
         r"probes\.x\.midpoint joins probes at layers 1 and 2"),
        ({"x": {"text": "the", "layer": 9}}, r"probes\.x\.layer = 9 is outside 0\.\.3"),
        ({"x": {"vector": "missing.npy", "layer": 1}}, r"probes\.x\.vector: missing\.npy does not exist"),
        ({}, "unknown probe 'x'"),
    ],
)  # fmt: skip
def test_bad_probes(llama, probes, message):
    with pytest.raises(ConfigError, match=message):
        probe_vector(llama, "x", probes)


def test_wrong_width_vector(llama, tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(7, dtype=np.float32))
    with pytest.raises(ConfigError, match=f"holds 7 values, the model's width is {llama.d_model}"):
        probe_vector(llama, "x", {"x": {"vector": str(tmp_path / "v.npy"), "layer": 1}})


def test_read_probe_has_every_lens_and_patchscope(llama):
    probes = {"p": {"text": "the dog saw the cat", "layer": 2}}
    settings = {"top_k": 4, "patchscope": {"max_new_tokens": 3}}
    reading = read_probe(llama, "p", probes, None, settings)
    assert reading["address"] == "resid.02" and reading["probe"] == "p"
    assert set(reading["lenses"]) == {
        "logit",
        "semantic_basis",
        "inverse_embedding_transpose",
        "inverse_embedding_pinv",
    }
    for result in reading["lenses"].values():
        assert len(result["top"]) == 4 and len(result["bottom"]) == 4
        assert all(is_readable(token) for token, _ in result["top_readable"])
        probs = [p for _, p in result["top"]]
        assert probs == sorted(probs, reverse=True) and max(p for _, p in result["bottom"]) <= min(probs)
    assert set(reading["patchscopes"]) == {"identity", "entity_description"}
    json.dumps(reading)


def test_readable_tokens():
    assert is_readable(" Paris") and is_readable("ĠParis") and is_readable("1135")
    assert not is_readable(" ") and not is_readable("->") and not is_readable(" café")


def test_cli_probe(tiny_model_dirs, capsys, tmp_path):
    args = ["probe", "--model", str(tiny_model_dirs["llama"]), "--text", "the dog saw", "--layer", "1"]
    assert main([*args, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resid.01") and "patchscope[identity]" in out and "semantic_basis" in out
    assert main([*args, "--json", "--targets", "identity", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)["patchscopes"]) == {"identity"}
    np.save(tmp_path / "v.npy", np.zeros(3, dtype=np.float32))
    vector_args = ["probe", "--model", str(tiny_model_dirs["llama"]), "--vector", str(tmp_path / "v.npy")]
    assert main([*vector_args, "--layer", "1", "--device", "cpu"]) == 2
    assert "holds 3 values" in capsys.readouterr().err


def test_logit_lens_reading_at_the_last_layer_is_the_models_next_token_distribution(llama):
    probes = {"p": {"text": "the dog saw the cat", "layer": 3}}
    reading = read_probe(llama, "p", probes, None, {"top_k": 4, "patchscope": {"max_new_tokens": 1}})
    with torch.no_grad():
        logits = llama.model(**llama.tokenizer("the dog saw the cat", return_tensors="pt")).logits[0, -1]
    probs, ids = torch.softmax(logits, -1).topk(4)
    got = reading["lenses"]["logit"]["top"]
    assert [token for token, _ in got] == [llama.tokenizer.decode([int(i)]) for i in ids]
    np.testing.assert_allclose([p for _, p in got], probs.numpy(), rtol=1e-5, atol=1e-6)
