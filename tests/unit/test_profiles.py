"""The workflow profiles name rules that exist (Snakemake ignores a misspelt rule in set-threads)."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = {
    name
    for path in (ROOT / "rules").glob("*.smk")
    for name in re.findall(r"^\s*rule (\w+):", path.read_text(), flags=re.MULTILINE)
}


@pytest.mark.parametrize("profile", ["default", "slurm"])
def test_set_threads_names_workflow_rules(profile):
    settings = yaml.safe_load((ROOT / "workflow" / "profiles" / profile / "config.v8+.yaml").read_text())
    named = set(settings.get("set-threads", {}))
    assert named, f"{profile} profile sets no threads"
    assert named <= RULES, f"{profile} profile names rules that do not exist: {sorted(named - RULES)}"


def test_the_default_profile_gives_its_jobs_one_thread():
    settings = yaml.safe_load((ROOT / "workflow" / "profiles" / "default" / "config.v8+.yaml").read_text())
    assert set(settings["set-threads"].values()) == {1}
