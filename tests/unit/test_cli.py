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
    assert "truncated or not an HDF5 file. Delete it and rebuild" in capsys.readouterr().err
