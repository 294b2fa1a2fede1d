"""The latent-atlas command."""

import json

import pytest

from latent_atlas.cli import main
from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.models import load_model
from tests.conftest import STORE_ATTRS


@pytest.fixture
def store_path(tiny_model_dirs, tiny_corpus, tmp_path):
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    settings = ExtractionSettings(dtype="float32", device="cpu")
    return extract_activations(loaded, tiny_corpus, tmp_path / "s.h5", settings, STORE_ATTRS, progress=False)


def test_inspect_describes_a_store(store_path, capsys):
    assert main(["inspect", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "valid latent-atlas store" in out and "resid.00, resid.01, resid.02, resid.03, ln_final" in out
    assert main(["inspect", "--json", str(store_path)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["n_docs"] == 8 and described["model"] == "tiny" and described["complete"] is True


def test_inspect_reports_bad_files_with_the_fix(tmp_path, capsys):
    (tmp_path / "x.h5").write_text("garbage")
    assert main(["inspect", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert "truncated or not an HDF5 file" in err and "snakemake" not in err  # no rule makes x.h5


def test_neighbours_lists_the_nearest_stored_states_with_their_text(store_path, tiny_model_dirs, capsys):
    model = str(tiny_model_dirs["llama"])
    args = ["neighbours", str(store_path), "--model", model, "--text", "the dog saw the cat", "--layer", "2"]
    assert main([*args, "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "resid.02: 3 nearest stored states by cosine" and len(lines) == 4
    assert all("⟦" in line for line in lines[1:])
    assert main([*args, "--k", "2", "--metric", "euclidean", "--standardise", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["rank"] for row in rows] == [1, 2] and rows[0]["score"] <= rows[1]["score"]
    assert {row["metric"] for row in rows} == {"euclidean"} and all(row["standardised"] for row in rows)


def test_neighbours_refuses_a_store_of_another_model(store_path, tiny_model_dirs, capsys):
    args = ["neighbours", str(store_path), "--model", str(tiny_model_dirs["gpt2"]), "--text", "a cat", "--layer", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was made from another model than the one given (the store's: tiny" in err and "Delete" not in err


def test_an_interrupted_command_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("latent_atlas.config.check_config_files", interrupted)
    assert main(["config"]) == 130
    assert capsys.readouterr().err == "latent-atlas: interrupted\n"
