"""Config validation: defaults filled in, every problem named by its key, shipped configs valid."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from latent_atlas.config import check_config_files, load_yaml, select_layers, validate_config
from latent_atlas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SCHEMA = load_yaml(REPO / "workflow/schemas/config.schema.yaml")
BASE = load_yaml(REPO / "config/config.yaml")


def _merged(*overlays: dict) -> dict:
    """Overlay configs the way Snakemake merges --configfile (nested dicts updated recursively)."""

    def update(base: dict, overlay: dict) -> dict:
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                update(base[key], value)
            else:
                base[key] = value
        return base

    config = copy.deepcopy(BASE)
    for overlay in overlays:
        update(config, copy.deepcopy(overlay))
    return config


@pytest.mark.parametrize("overlay", [None, "config/ci.yaml", "config/paper.yaml"])
def test_shipped_configs_are_valid(overlay):
    config = _merged(load_yaml(REPO / overlay)) if overlay else _merged()
    validate_config(config, SCHEMA)
    assert config["extraction"]["dtype"] in ("float16", "float32")


def test_defaults_are_filled_in():
    config = {
        "run": {"models": ["m"], "corpora": ["c"]},
        "models": {"m": {"source": "local", "path": "/x"}},
        "corpora": {"c": {"format": "jsonl", "path": "c.jsonl"}},
    }
    validate_config(config, SCHEMA)
    assert config["paths"] == {"resources": "resources"}
    assert config["extraction"]["layers"] == "all"
    assert config["extraction"]["dtype"] == "float16"
    assert config["extraction"]["splits"] == ["train", "heldout"]
    assert config["corpora"]["c"]["heldout_fraction"] == 0.2
    assert config["models"]["m"]["dtype"] == "float32"


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"extraction": {"dtype": "float8"}}, r"config key 'extraction\.dtype': 'float8' is not one of"),
        ({"extraction": {"batchsize": 4}}, r"config key 'extraction'.*'batchsize' was unexpected.*spelling"),
        ({"extraction": {"layers": {"every": 0}}}, r"config key 'extraction\.layers'"),
        ({"extraction": {"token_fraction": 0}}, r"config key 'extraction\.token_fraction'"),
        ({"models": {"smollm2-135m": {"sha256": "abc"}}}, r"config key 'models\.smollm2-135m\.sha256'"),
        ({"models": {"x": {"source": "hf"}}}, r"config key 'models\.x': 'repo' is a required property"),
        ({"models": {"x": {"source": "ftp"}}}, r"config key 'models\.x\.source': 'ftp' is not one of"),
        ({"corpora": {"y": {"format": "jsonl"}}}, r"config key 'corpora\.y': 'path' is a required property"),
        ({"run": {"models": []}}, r"config key 'run\.models'"),
    ],
)
def test_invalid_configs_name_the_key(overlay, message):
    with pytest.raises(ConfigError, match=message) as raised:
        validate_config(_merged(overlay), SCHEMA, source="test.yaml")
    assert "invalid configuration in test.yaml" in str(raised.value)


def test_run_must_name_defined_models_and_corpora():
    with pytest.raises(ConfigError, match=r"'run\.models' names 'gpt-x', which is not defined under 'models'"):
        validate_config(_merged({"run": {"models": ["gpt-x"]}}), SCHEMA)
    with pytest.raises(ConfigError, match=r"'run\.corpora' names 'wiki'"):
        validate_config(_merged({"run": {"corpora": ["wiki"]}}), SCHEMA)


def test_all_errors_are_listed_at_once():
    with pytest.raises(ConfigError) as raised:
        validate_config(_merged({"extraction": {"dtype": "x", "device": "tpu"}}), SCHEMA)
    assert "extraction.dtype" in str(raised.value) and "extraction.device" in str(raised.value)


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("run: [unclosed")
    with pytest.raises(ConfigError, match=r"bad\.yaml:1:\d+: not valid YAML .*starts at line 1, column 6"):
        load_yaml(tmp_path / "bad.yaml")


def test_every_schema_property_is_described():
    def walk(node, path):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                assert "description" in sub or "$ref" in sub, f"{path}.{name} has no description"
                walk(sub, f"{path}.{name}")
            walk(node.get("additionalProperties"), f"{path}.*")

    walk(SCHEMA, "config")
    assert yaml.safe_dump(SCHEMA)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ([0, 2, -1], [0, 2, 5]),
        ([3, 3, 1], [1, 3]),
        ({"every": 2}, [0, 2, 4, 5]),
        ({"every": 5}, [0, 5]),
        ({"every": 10}, [0, 5]),
    ],
)
def test_select_layers(spec, expected):
    assert select_layers(spec, 5) == expected


@pytest.mark.parametrize(
    ("spec", "message"), [([7], r"outside 0\.\.5"), ("some", "must be 'all'"), ({"every": 0}, ">= 1")]
)
def test_select_layers_rejects(spec, message):
    with pytest.raises(ConfigError, match=message):
        select_layers(spec, 5)


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ({"m": {"midpoint": ["a", "b"]}, "a": {"text": "x", "layer": 1}, "b": {"text": "y", "layer": 2}},
         r"'probes\.m\.midpoint' joins probes at layers \[1, 2\]"),
        ({"m": {"midpoint": ["a", "zz"]}, "a": {"text": "x", "layer": 1}}, r"'probes\.m\.midpoint' names 'zz'"),
        ({"m": {"midpoint": ["n", "n"]}, "n": {"midpoint": ["m", "m"]}}, "in a cycle"),
        ({"m": {"text": "x"}}, r"config key 'probes\.m'"),
    ],
)  # fmt: skip
def test_bad_probes_fail_at_validation(probes, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_merged({"probes": probes}), SCHEMA)


def test_run_probes_must_be_defined():
    with pytest.raises(ConfigError, match=r"'run\.probes' names 'nope'"):
        validate_config(_merged({"run": {"probes": ["nope"]}}), SCHEMA)


_TWO_PROBES = {"a": {"text": "x", "layer": 1}, "b": {"text": "y", "layer": 2}}


@pytest.mark.parametrize(
    ("neighbourhood", "message"),
    [
        ({"points": ["zz"]}, r"'neighbourhood\.points' names 'zz', which is not a probe"),
        ({"paths": {"p": ["a", "zz"]}}, r"'neighbourhood\.paths\.p' names \['zz'\]"),
        ({"paths": {"p": ["a", "b"]}}, r"'neighbourhood\.paths\.p' joins probes at layers \[1, 2\]"),
        ({"paths": {"a": ["a", "a"]}}, r"'neighbourhood\.paths\.a': the name is also a point or probe"),
        ({"radii": [-0.1]}, r"config key 'neighbourhood\.radii\.0'"),
        ({"families": ["sideways"]}, r"config key 'neighbourhood\.families\.0'"),
    ],
)
def test_bad_neighbourhoods_fail_at_validation(neighbourhood, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_merged({"probes": _TWO_PROBES, "neighbourhood": neighbourhood}), SCHEMA)


def test_paths_across_layers_are_fine_when_the_neighbourhood_sets_its_layers():
    config = _merged({"probes": _TWO_PROBES, "neighbourhood": {"paths": {"p": ["a", "b"]}, "layers": [3]}})
    validate_config(config, SCHEMA)
    assert config["neighbourhood"]["radii"][0] == 0.0  # defaults filled


@pytest.mark.parametrize("overlay", [None, "config/ci.yaml", "config/paper.yaml", "config/study.yaml"])
def test_shipped_configs_pass_the_parse_time_checks_on_the_real_depths(overlay, tmp_path, monkeypatch):
    for model, blocks in (("smollm2-135m", 30), ("gemma3-270m", 18)):  # the models' config.json num_hidden_layers
        (tmp_path / model).mkdir()
        (tmp_path / model / "manifest.json").write_text(json.dumps({"n_layers": blocks}))
    monkeypatch.chdir(REPO)
    files = [REPO / "config/config.yaml", *([REPO / overlay] if overlay else [])]
    check_config_files(files, REPO / "workflow/schemas/config.schema.yaml", tmp_path)
