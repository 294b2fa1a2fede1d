"""The atlas page in a real browser: headless Chromium (Debian's) runs its script; the DOM it leaves is checked
against the tables computed independently in tests/unit/test_atlas.py (direct unembedding, brute-force search).
"""

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from latent_atlas.atlas.page import write_page
from tests.unit.test_atlas import SETTINGS, build_case, check_neighbours, direct_readings

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; CI does)"
)


def dump_dom(page: Path, fragment: str, profile: Path) -> str:
    """The DOM after the page's script ran, opened at ``page#fragment`` from file://."""
    command = [
        str(CHROMIUM),
        *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
        *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
        f"--user-data-dir={profile}",
        "--dump-dom",
        f"{page.as_uri()}#{fragment}",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


class Elements(HTMLParser):
    """Every start tag's attributes, with its classes split, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str], list[dict[str, str]]]] = []
        self._open: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        self.tags.append((tag, values, list(self._open)))
        if tag in ("td", "tr", "div", "section", "span", "p"):
            self._open.append(values)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "tr", "div", "section", "span", "p") and self._open:
            self._open.pop()

    def with_class(self, name: str) -> list[tuple[dict[str, str], list[dict[str, str]]]]:
        return [(attrs, parents) for _, attrs, parents in self.tags if name in attrs.get("class", "").split()]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build_case(tmp_path_factory.mktemp("atlas-browser"))


def test_the_page_shows_the_tables_it_came_from(case, tmp_path):
    page = tmp_path / "atlas.html"
    kept = write_page(case.payload, page, 4_000_000)
    document = kept["documents"][1]
    token, layer, index = 3, 2, kept["meta"]["layers"].index(2)
    fragment = f"doc={document['doc_id']}&token={token}&layer={layer}&lens=tuned&colour=norm"
    dom = Elements()
    dom.feed(dump_dom(page, fragment, tmp_path / "profile"))

    body = next(attrs for tag, attrs, _ in dom.tags if tag == "body")
    assert body.get("data-ready") == "true"  # the script ran to its end
    tokens = dom.with_class("tok")
    assert len(tokens) == len(document["ids"]) == min(SETTINGS.max_tokens, document["token_count"])
    assert [int(attrs["data-id"]) for attrs, _ in tokens] == document["ids"]
    selected = next(attrs for tag, attrs, _ in dom.tags if attrs.get("id") == "selected")
    assert (selected["data-doc"], int(selected["data-token"])) == (document["doc_id"], token)

    # lens readings of the chosen token at every layer, against the direct unembedding
    for at in kept["meta"]["layers"]:
        direct = direct_readings(case, document, at)
        for name in ("logit", "tuned"):
            shown = [
                (int(attrs["data-id"]), float(attrs["data-p"]))
                for attrs, parents in dom.with_class("cand")
                if any(p.get("data-lens") == name and p.get("data-layer") == str(at) for p in parents)
            ]
            if at not in kept["meta"]["lens_layers"][name]:
                assert not shown
                continue
            top = np.argsort(-direct[name][token])[: SETTINGS.top_k]
            assert [i for i, _ in shown] == top.tolist(), (name, at)
            np.testing.assert_allclose([p for _, p in shown], np.exp(direct[name][token][top]), atol=1e-4)
    model = [
        int(a["data-id"])
        for a, parents in dom.with_class("cand")
        if any(p.get("id") == "model-prediction" for p in parents)
    ]
    assert model == np.argsort(-direct_readings(case, document, 3)["model"][token])[: SETTINGS.top_k].tolist()

    # its neighbours at the chosen layer: the page's table, and the brute-force search
    rows = [
        (int(attrs["data-row"]), float(attrs["data-score"]))
        for _, attrs, _ in dom.tags
        if "nn" in attrs.get("class", "").split()
    ]
    assert [row for row, _ in rows] == document["neighbours"]["rows"][index][token]
    check_neighbours(
        case.store_path,
        layer,
        np.array([document["token_start"] + token]),
        [[row for row, _ in rows]],
        [[score for _, score in rows]],
        SETTINGS.neighbours_k,
    )
