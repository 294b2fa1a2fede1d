"""What a user meets at the keyboard: each bad input gives one message naming the key or the file, no traceback.

One table per kind of input: config files (checked as the workflow checks them at parse time, with the file
that set each bad key), the command line, stores and model directories (advice to rebuild only for an output
of the workflow), and the temporaries a killed writer leaves.
"""

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from latent_atlas.cli import main
from latent_atlas.config import ConfigSources, check_config_files
from latent_atlas.errors import ConfigError, StoreError
from latent_atlas.provenance import atomic_output
from latent_atlas.store import ActivationStore, StoreWriter

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "config/config.yaml"
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """The probe caches pseudo-inverses; the tests keep theirs out of the user's cache folder."""
    monkeypatch.setenv("LATENT_ATLAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def models_root(tmp_path):
    """An acquired smollm2-135m, as far as its manifest says (30 blocks)."""
    manifest = tmp_path / "models/smollm2-135m/manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"name": "smollm2-135m", "n_layers": 30}))
    return tmp_path / "models"


CONFIG_CASES = {
    "unknown key": ("lenses:\n  top_kk: 3\n", [r"config key 'lenses'", "'top_kk' was unexpected"]),
    "wrong type": ("lenses:\n  top_k: many\n", [r"config key 'lenses\.top_k'"]),
    "empty probe text": (
        "probes:\n  eiffel-paris: {text: '', layer: 1}\n",
        [r"config key 'probes\.eiffel-paris\.text'", "should be non-empty"],
    ),
    "extraction layer beyond the model": (
        "extraction:\n  layers: [0, 2, 77]\n",
        [r"config key 'extraction\.layers' selects layers \[77\], outside 0\.\.30", "smollm2-135m/manifest.json"],
    ),
    "lens layer beyond the model": (
        "lenses:\n  layers: [99]\n",
        [r"config key 'lenses\.layers' selects layers \[99\]", "smollm2-135m/manifest.json"],
    ),
    "probe layer beyond the model": (
        "run: {probes: [m]}\nprobes:\n  a: {text: x, layer: 40}\n  b: {text: y, layer: 40}\n  m: {midpoint: [a, b]}\n",
        [r"config key 'probes\.a\.layer' is 40, outside 0\.\.30", "smollm2-135m/manifest.json"],
    ),
    "missing corpus file": (
        "corpora:\n  registers: {path: config/corpora/nowhere.jsonl}\n",
        [r"config key 'corpora\.registers\.path' is 'config/corpora/nowhere\.jsonl', which does not exist"],
    ),
    "YAML syntax": ("lenses:\n  top_k: [1,\n  seed: 2\n", [r"overlay\.yaml:\d+:\d+: not valid YAML", "line 2"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_bad_config_names_the_key_and_the_overlay_file(case, tmp_path, models_root, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # corpus paths are relative to the working directory, as in the workflow
    text, patterns = CONFIG_CASES[case]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text)
    with pytest.raises(ConfigError) as error:
        check_config_files([BASE, overlay], SCHEMA, models_root)
    message = str(error.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert str(overlay) in message  # the file the bad key came from (or the file that does not parse)
    args = ["config", str(overlay), "--base", str(BASE), "--schema", str(SCHEMA), "--models", str(models_root)]
    assert main(args) == 2  # the command says the same, in one message, with no traceback
    err = capsys.readouterr().err
    assert err.startswith("latent-atlas: ") and str(overlay) in err and "Traceback" not in err


def test_a_key_is_blamed_on_the_last_file_that_sets_it(tmp_path, models_root, monkeypatch):
    monkeypatch.chdir(REPO)
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("extraction:\n  layers: [77]\n")
    second.write_text("extraction:\n  layers: [78]\n")
    with pytest.raises(ConfigError, match=r"\[78\].*\[set in .*second\.yaml\]"):
        check_config_files([BASE, first, second], SCHEMA, models_root)
    assert check_config_files([BASE], SCHEMA, models_root)["run"]["models"] == ["smollm2-135m"]


def test_the_workflows_sources_put_its_own_configfile_first_and_command_line_values_last(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    overlay = tmp_path / "o.yaml"
    overlay.write_text("lenses:\n  top_k: 3\n")
    workflow = SimpleNamespace(  # what Snakemake 9 holds: command-line files, then the Snakefile's configfile
        configfiles=[overlay.absolute(), str(BASE)],
        config_settings=SimpleNamespace(configfiles=[overlay.absolute()], config={"lenses": {"seed": -1}}),
    )
    sources = ConfigSources.of_workflow(workflow)
    assert sources.files == ["config/config.yaml", str(overlay), "--config"]  # shown as typed, below the cwd
    assert sources.origin(["lenses", "top_k"]) == str(overlay)
    assert sources.origin(["lenses", "seed"]) == "--config"
    assert sources.origin(["run", "models"]) == "config/config.yaml"


def test_a_probe_layer_is_checked_only_once_the_models_depth_is_known(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    overlay = tmp_path / "o.yaml"
    overlay.write_text("extraction:\n  layers: [0, 5, 77]\n")
    check_config_files([BASE, overlay], SCHEMA, tmp_path / "no-models")  # no manifest yet: the job checks


CLI_CASES = {
    "empty text": (["probe", "--text", "", "--layer", "1"], "--text is empty"),
    "position beyond the text": (
        ["probe", "--text", "the dog", "--layer", "1", "--position", "50"],
        "position 50 is outside a text of 2 tokens",
    ),
    "layer beyond the model": (["probe", "--text", "the dog", "--layer", "4"], r"--layer 4: outside 0\.\.3"),
    "missing texts file": (["probe", "--texts-file", "absent.txt", "--layer", "1"], "--texts-file absent.txt"),
    "missing vector": (["probe", "--vector", "absent.npy", "--layer", "1"], "--vector: absent.npy does not exist"),
    "not a model directory": (["probe", "--text", "a", "--layer", "1", "--model", "README.md"], "README.md has no"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_command_lines_give_one_line(case, tiny_model_dirs, capsys):
    args, pattern = CLI_CASES[case]
    model = [] if "--model" in args else ["--model", str(tiny_model_dirs["llama"])]
    assert main([*args, *model, "--device", "cpu", "--no-tuned"]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]  # progress bars may come before it, on stderr
    assert last.startswith("latent-atlas: ") and re.search(pattern, last), err
    assert "Traceback" not in err and "snakemake README.md" not in err  # no rule makes README.md/manifest.json


def _foreign_hdf5(path: Path) -> Path:
    with h5py.File(path, "w") as file:
        file["data"] = np.zeros(3)
    return path


STORE_CASES = {
    "a directory": (lambda tmp: tmp, "is a directory, not an activation store"),
    "someone else's HDF5 file": (lambda tmp: _foreign_hdf5(tmp / "x.h5"), "not a latent-atlas activation store"),
    "a missing file": (lambda tmp: tmp / "x.h5", r"x\.h5 does not exist\. Check the path"),
}


@pytest.mark.parametrize("case", STORE_CASES)
def test_stores_not_made_by_the_workflow_get_no_rebuild_advice(case, tmp_path):
    make, pattern = STORE_CASES[case]
    path = make(tmp_path)
    with pytest.raises(StoreError, match=pattern) as error:
        ActivationStore(path)
    assert str(path) in str(error.value) and "snakemake" not in str(error.value)


def _ended() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_killed_writers_temporary_is_removed_when_the_output_is_written_again(tmp_path):
    path = tmp_path / "s.h5"
    stale = tmp_path / f".s.h5.tmp-{_ended()}"
    stale.write_bytes(b"half a store")
    alive = tmp_path / f".s.h5.tmp-{os.getppid()}"  # a writer that still runs is left alone
    alive.write_bytes(b"another writer's work")
    other = tmp_path / f".t.h5.tmp-{_ended()}"  # another output's: not ours to remove
    other.write_bytes(b"")
    with StoreWriter(path, 0, 2, [0], "float32", {}) as writer:
        writer.write_tokens(np.zeros(0), np.zeros(0), np.zeros(0))
    assert path.is_file() and not stale.exists() and alive.exists() and other.exists()
    stale.write_bytes(b"half a table")
    table = tmp_path / "t.parquet"
    stale_table = tmp_path / f".t.parquet.tmp-{_ended()}"
    stale_table.mkdir()  # atomic outputs may be directories
    with atomic_output(table) as tmp:
        tmp.write_text("done")
    assert table.read_text() == "done" and not stale_table.exists()
