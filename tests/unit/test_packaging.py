"""The repository's promises: two-command quick start, CI calls the tests, conda spec matches pyproject."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert re.search(r"^make test\b", (REPO / ".ci/run").read_text(), re.MULTILINE)


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python == "python=3.11" and pyproject["project"]["requires-python"] == ">=3.11"
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    torch_requirement = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert torch_requirement in pip
    editable = next(p for p in pip if p.startswith("-e ."))
    extras = set(re.search(r"\[(.*)\]", editable).group(1).split(","))
    assert extras <= set(pyproject["project"]["optional-dependencies"])


def test_makefile_pins_torch_before_installing():
    makefile = (REPO / "Makefile").read_text()
    assert "TORCH_SPEC ?= torch==2.13.0" in makefile
    assert makefile.index('"$(TORCH_SPEC)"') < makefile.index('install --quiet -e ".[dev,reports]"')


def test_every_rule_file_is_included_and_every_script_exists():
    snakefile = (REPO / "workflow/Snakefile").read_text()
    for rules in (REPO / "rules").glob("*.smk"):
        assert f'include: "../rules/{rules.name}"' in snakefile
        for script in re.findall(r'script:\s*"\.\./scripts/([\w.]+)"', rules.read_text()):
            assert (REPO / "scripts" / script).is_file(), script


def test_results_are_ignored():
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"results/", "resources/", ".venv/"} <= set(ignored)
