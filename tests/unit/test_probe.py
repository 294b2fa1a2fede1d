"""Probes: resolving points from config, reading them with every lens and patchscope, and the CLI."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from latent_atlas.cli import main
from latent_atlas.errors import ConfigError
from latent_atlas.lenses.base import Unembed
from latent_atlas.lenses.pipeline import read_probe
from latent_atlas.lenses.probe import cached_pinv, is_readable, probe_vector
from latent_atlas.lenses.tuned import TunedLens
from latent_atlas.models import load_model


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """The probe caches pseudo-inverses; the tests keep theirs out of the user's cache folder."""
    monkeypatch.setenv("LATENT_ATLAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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


def _probe(model_dir, *extra: str) -> list[str]:
    return ["probe", "--model", str(model_dir), "--max-new-tokens", "2", "--device", "cpu", "--no-tuned", *extra]


def test_cli_probe(tiny_model_dirs, capsys, tmp_path):
    model = tiny_model_dirs["llama"]
    assert main(_probe(model, "--text", "the dog saw", "--layer", "1")) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-llama  weights sha256") and "tuned lens: off (--no-tuned)" in out
    assert "resid.01" in out and "patchscope[identity]" in out and "semantic_basis" in out
    assert main(_probe(model, "--text", "the dog saw", "--layer", "1", "--json", "--targets", "identity")) == 0
    reading = json.loads(capsys.readouterr().out)
    assert set(reading["points"][0]["readings"][0]["patchscopes"]) == {"identity"}
    np.save(tmp_path / "v.npy", np.zeros(3, dtype=np.float32))
    assert main(_probe(model, "--vector", str(tmp_path / "v.npy"), "--layer", "1")) == 2
    assert "holds 3 values" in capsys.readouterr().err


def test_cli_probe_shows_the_read_token_and_the_models_prediction(llama, tiny_model_dirs, capsys):
    text = "the dog saw the cat"
    assert main(_probe(tiny_model_dirs["llama"], "--text", text, "--layer", "2", "--position", "1", "--json")) == 0
    reading = json.loads(capsys.readouterr().out)
    ids = llama.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = llama.model(input_ids=ids).logits[0, 1]
    probs, top = torch.softmax(logits, -1).topk(8)
    point = reading["points"][0]
    assert reading["model"] == "tiny-llama" and reading["model_sha256"] == llama.manifest["weights_sha256"]
    assert point["position"] == 1 and point["n_tokens"] == ids.shape[1]
    assert point["token"] == llama.tokenizer.decode([int(ids[0, 1])])
    assert [token for token, _ in point["prediction"]] == [llama.tokenizer.decode([int(i)]) for i in top]
    np.testing.assert_allclose([p for _, p in point["prediction"]], probs.numpy(), rtol=1e-5, atol=1e-7)
    norm = float(_hidden_states(llama, text)[2][0, 1].norm())  # resid.02 is hidden_states[2] below the last layer
    assert point["readings"][0]["norm"] == pytest.approx(norm, rel=1e-5)


def test_cli_probe_reads_several_layers_and_texts_in_one_call(tiny_model_dirs, capsys, tmp_path):
    model = tiny_model_dirs["llama"]
    texts = ["the dog saw", "a cat ran home"]
    (tmp_path / "texts.txt").write_text(f"{texts[0]}\n\n{texts[1]}\n")
    assert main(_probe(model, "--texts-file", str(tmp_path / "texts.txt"), "--layer", "3", "1", "--json")) == 0
    together = json.loads(capsys.readouterr().out)["points"]
    assert [point["text"] for point in together] == texts
    assert [[r["address"] for r in point["readings"]] for point in together] == [["resid.03", "resid.01"]] * 2
    for text, point in zip(texts, together, strict=True):  # one text per call gives the same readings
        assert main(_probe(model, "--text", text, "--layer", "3", "1", "--json")) == 0
        assert json.loads(capsys.readouterr().out)["points"][0] == point
    assert main(_probe(model, "--text", "the dog", "--layers", "all", "--json")) == 0
    readings = json.loads(capsys.readouterr().out)["points"][0]["readings"]
    assert [r["layer"] for r in readings] == [0, 1, 2, 3]


def test_cli_probe_finds_the_models_own_tuned_lens(llama, tiny_model_dirs, capsys, tmp_path):
    model = tmp_path / "results" / "models" / "tiny"
    shutil.copytree(tiny_model_dirs["llama"], model)
    lens = TunedLens(Unembed.from_parts(llama.parts), llama.n_layers, llama.d_model)
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(llama.d_model, llama.d_model, generator=generator), torch.randn(llama.d_model)
    with torch.no_grad():
        lens.translators[1].weight.copy_(weight)
        lens.translators[1].bias.copy_(bias)
    lens.trained_layers = [1]
    path = tmp_path / "results" / "lenses" / "tiny" / "corpus.tuned-lens.pt"
    lens.save(path)
    args = ["probe", "--model", str(model), "--text", "the dog saw", "--layer", "1", "--max-new-tokens", "1"]
    assert main([*args, "--device", "cpu", "--json", "--k", "3"]) == 0
    reading = json.loads(capsys.readouterr().out)
    assert reading["tuned_lens"] == str(path)
    h = _hidden_states(llama, "the dog saw")[1][0, -1]
    with torch.no_grad():  # the tuned lens by hand: final norm and head of h + W h + b
        probs = torch.softmax(llama.model.lm_head(llama.model.model.norm(h + weight @ h + bias)), -1)
    expected = [llama.tokenizer.decode([int(i)]) for i in probs.topk(3).indices]
    assert [token for token, _ in reading["points"][0]["readings"][0]["lenses"]["tuned"]["top"]] == expected
    assert main([*args[:-4], "--layer", "2", "--max-new-tokens", "1", "--device", "cpu"]) == 0
    assert re.search(r"\ntuned +\(not trained at resid\.02 \(trained at 1\)\)\n", capsys.readouterr().out)
    assert main([*args, "--device", "cpu", "--no-tuned"]) == 0
    out = capsys.readouterr().out
    assert "tuned lens: off" in out and "\ntuned " not in out


def test_cached_pinv_is_the_pseudo_inverse_and_is_reused(tmp_path):
    matrix = torch.randn(6, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = cached_pinv(matrix, "m", directory=tmp_path)
    (saved,) = tmp_path.glob("pinv-m-*.pt")
    torch.testing.assert_close(first.pseudo_inverse, torch.linalg.pinv(matrix), rtol=1e-9, atol=1e-12)
    again = cached_pinv(matrix, "m", directory=tmp_path)  # read back (float32 on disk)
    torch.testing.assert_close(again.pseudo_inverse, torch.linalg.pinv(matrix), rtol=1e-6, atol=1e-7)
    assert again.rank == 6 and saved.stat().st_size > 0
    saved.write_bytes(b"broken")  # a damaged entry is recomputed, not trusted
    torch.testing.assert_close(cached_pinv(matrix, "m", directory=tmp_path).pseudo_inverse, first.pseudo_inverse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "", "--layer", "1"], "--text is empty"),
        (["--text", "the dog", "--layer", "1", "--position", "50"], "position 50 is outside a text of 2 tokens"),
        (["--text", "the dog", "--layer", "1", "9"], r"--layer 9: outside 0\.\.3"),
        (["--texts-file", "nowhere.txt", "--layer", "1"], "--texts-file nowhere.txt does not exist"),
    ],
)
def test_cli_probe_refuses_bad_input_in_one_line(tiny_model_dirs, capsys, extra, message):
    assert main(_probe(tiny_model_dirs["llama"], *extra)) == 2
    err = capsys.readouterr().err  # progress bars may come before it, on stderr: the error is one last line
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("latent-atlas: ") and re.search(message, last) and "Traceback" not in err


def test_logit_lens_reading_at_the_last_layer_is_the_models_next_token_distribution(llama):
    probes = {"p": {"text": "the dog saw the cat", "layer": 3}}
    reading = read_probe(llama, "p", probes, None, {"top_k": 4, "patchscope": {"max_new_tokens": 1}})
    with torch.no_grad():
        logits = llama.model(**llama.tokenizer("the dog saw the cat", return_tensors="pt")).logits[0, -1]
    probs, ids = torch.softmax(logits, -1).topk(4)
    got = reading["lenses"]["logit"]["top"]
    assert [token for token, _ in got] == [llama.tokenizer.decode([int(i)]) for i in ids]
    np.testing.assert_allclose([p for _, p in got], probs.numpy(), rtol=1e-5, atol=1e-6)


def test_a_text_probe_records_the_token_it_reads_and_the_models_own_prediction_there(llama):
    text = "the dog saw the cat"
    probes = {"p": {"text": text, "layer": 2, "position": 2}, "v": {"midpoint": ["p", "p"]}}
    reading = read_probe(llama, "p", probes, None, {"top_k": 3, "patchscope": {"max_new_tokens": 1}})
    ids = llama.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs, top = torch.softmax(llama.model(input_ids=ids).logits[0, 2], -1).topk(3)
    assert reading["token"] == llama.tokenizer.decode([int(ids[0, 2])])
    assert reading["position"] == 2 and reading["n_tokens"] == ids.shape[1]
    assert [token for token, _ in reading["model_prediction"]] == [llama.tokenizer.decode([int(i)]) for i in top]
    np.testing.assert_allclose([p for _, p in reading["model_prediction"]], probs.numpy(), rtol=1e-5, atol=1e-6)
    assert "token" not in read_probe(llama, "v", probes, None, {"top_k": 3, "patchscope": {"max_new_tokens": 1}})
