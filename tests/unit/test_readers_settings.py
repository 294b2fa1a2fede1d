"""The readers' settings: built once from the config sections the rules pass, typed, and checked by key."""

from pathlib import Path

import pytest

from latent_atlas.config import load_yaml
from latent_atlas.errors import ConfigError
from latent_atlas.readers.settings import ClusteringSettings, ComparisonSettings, ElmPath, ElmSettings

REPO = Path(__file__).resolve().parents[2]
TASK = {"corpus": "registers", "label_words": {"narrative": " story", "how_to": " guide"}}


def test_the_default_configs_readers_build_for_every_task():
    readers = load_yaml(REPO / "config/config.yaml")["readers"]
    for name, task in readers["tasks"].items():
        settings = ComparisonSettings.from_config(
            name, task=task, clustering=readers["clustering"], lora=readers["lora"], max_tokens=readers["max_tokens"]
        )
        assert settings.task.name == name and settings.task.label_words == task["label_words"]
        assert settings.clustering.seeds == tuple(readers["clustering"]["seeds"])
        assert settings.lora is None  # off in the default run
    elm = ElmSettings.from_config(
        {"elm": readers["elm"], "task": readers["tasks"][readers["elm"]["task"]], "max_tokens": readers["max_tokens"]}
    )
    assert (elm.task.name, elm.layer, elm.steps, elm.max_tokens) == ("registers", 15, 44, 48)


def test_lora_seeds_fall_back_to_clusterings_and_a_missing_section_means_no_lora():
    clustering = {"seeds": [3, 4], "tasks": ["registers"]}  # the rule drops tasks; either way is accepted
    on = ComparisonSettings.from_config("t", task=TASK, clustering=clustering, lora={"rank": 2}, max_tokens=8)
    assert on.lora is not None and on.lora.rank == 2 and on.lora_seeds == (3, 4)
    own = ComparisonSettings.from_config("t", task=TASK, clustering={}, lora={"seeds": [9]}, max_tokens=8)
    assert own.lora_seeds == (9,)
    assert ComparisonSettings.from_config("t", task=TASK, clustering={}, lora=None, max_tokens=8).lora is None


def test_an_elm_training_job_builds_without_the_evaluation_keys():
    section = {"task": "t", "layer": 2, "path": {"from": "narrative", "to": "how_to", "scales": [0, 1]}}
    full = ElmSettings.from_config({"elm": section, "task": TASK, "max_tokens": 8})
    assert full.path == ElmPath(from_label="narrative", to_label="how_to", scales=(0, 1))
    trained = ElmSettings.from_config({"elm": {"task": "t", "layer": 2}, "task": TASK, "max_tokens": 8})
    assert trained.layer == 2 and trained.prompts["register"].count("<embedding>") == 1


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ClusteringSettings.from_config({"epoch": 3}), r"readers\.clustering\.epoch"),
        (lambda: ClusteringSettings.from_config({"variants": ["all"]}), r"readers\.clustering\.variants"),
        (lambda: ElmSettings.from_config({"elm": {"task": "t", "pooling": "max"}, "task": TASK, "max_tokens": 8}),
         r"readers\.elm\.pooling"),
        (lambda: ElmSettings.from_config({"elm": {"task": "t", "path": {"via": "x"}}, "task": TASK, "max_tokens": 8}),
         r"readers\.elm\.path\.via"),
    ],
)  # fmt: skip
def test_a_bad_key_or_value_is_named(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
