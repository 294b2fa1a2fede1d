"""Every report caption renders as Snakemake renders it (Jinja, then docutils) without a docutils message.

docutils prints a warning or error (an undefined substitution from a stray ``|``, a bad title underline) to
stderr and carries on, so a broken caption only shows as a red box in the report. Here every message fails.
"""

from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
from docutils.core import publish_parts
from docutils.utils import SystemMessage

from latent_atlas.config import load_yaml, validate_config
from tests.unit.test_config import _merged

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = sorted((REPO / "workflow/report").glob("*.rst"))
SCHEMA = load_yaml(REPO / "workflow/schemas/config.schema.yaml")
WILDCARDS = SimpleNamespace(model="smollm2-135m", corpus="registers", point="eiffel-paris", path="cat-to-dog")


def _config(overlay: str | None) -> dict:
    """The shipped config with an overlay merged the way Snakemake merges --configfile, defaults filled."""
    config = _merged(load_yaml(REPO / overlay)) if overlay else _merged()
    validate_config(config, SCHEMA)
    return config


def _render(caption: Path, config: dict) -> str:
    """Jinja with a strict undefined (a misspelt config key fails), then docutils halting on any warning."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    snakemake = SimpleNamespace(config=config, wildcards=WILDCARDS, params=SimpleNamespace(), rule="caption")
    text = env.from_string(caption.read_text()).render(snakemake=snakemake, categories={}, files={})
    settings = {"halt_level": 2, "report_level": 2, "warning_stream": False}
    return publish_parts(text, writer="html", settings_overrides=settings)["body"]


def test_captions_exist():
    assert len(CAPTIONS) >= 20 and (REPO / "workflow/report/workflow.rst") in CAPTIONS


@pytest.mark.parametrize("overlay", [None, "config/ci.yaml", "config/paper.yaml"])
@pytest.mark.parametrize("caption", CAPTIONS, ids=lambda path: path.stem)
def test_caption_renders_without_docutils_messages(caption, overlay):
    body = _render(caption, _config(overlay))
    assert "system-message" not in body and body.strip()


def test_a_stray_bar_is_caught():
    """The check itself fails on the defect it guards against (``|Δ logit|`` read as a substitution)."""
    with pytest.raises(SystemMessage, match="Undefined substitution"):
        publish_parts("max |Δ logit| in the label", writer="html", settings_overrides={"halt_level": 2})
