"""The front door holds: README.md is short, every link in it and in docs/ resolves, the code's "METHODS §x"
references name sections of docs/methods.md, every dotted config key the docs name exists in the schema, and the
layout block of docs/architecture.md lists the library's top-level modules and packages."""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
PAGES = [README, *DOCS]
START, END = "<!-- findings:start -->", "<!-- findings:end -->"
README_LIMIT = 10_000  # bytes, without the generated findings block

FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
SECTION = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
REFERENCE = re.compile(r"(?:METHODS|docs/methods\.md)\s*§")
SECTION_NUMBER = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s*[-–]\s*(\d+(?:\.\d+)*))?")
DOTTED = re.compile(r"`([a-z][a-z0-9_]*(?:\.(?:[a-z0-9_]+|\*))+)`")
FILE_SUFFIXES = {"py", "smk", "md", "yaml", "yml", "parquet", "h5", "json", "jsonl", "pt", "png", "pdf", "csv", "npz"}


def _prose(text: str) -> str:
    """The text without fenced code blocks (whose brackets are program output, not links)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for match in HEADING.finditer(_prose(page.read_text())):
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _links(page: Path) -> Iterator[str]:
    for match in LINK.finditer(INLINE_CODE.sub("", _prose(page.read_text()))):
        yield match.group(1)


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert _broken_links(page) == []


def test_link_checker_catches_a_missing_file_and_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## 1. A section (with) punctuation — here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#1-a-section-with-punctuation--here) [web](https://example.org/x)\n"
        "[gone](missing.md) [bad](other.md#nowhere) `[code](ignored.md)`\n```\n[also](ignored.md)\n```\n"
    )
    assert _broken_links(page) == [
        "missing.md (no such file)",
        "other.md#nowhere (no such heading)",
    ]


def _methods_sections() -> set[str]:
    return set(SECTION.findall((REPO / "docs/methods.md").read_text()))


def _code_references() -> Iterator[tuple[str, str]]:
    for folder in ("src", "scripts", "rules", "tests", "workflow", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in {".py", ".smk", ".rst", ""} or not path.is_file() or "egg-info" in str(path):
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                found = REFERENCE.search(line)
                if not found:
                    continue
                for first, last in SECTION_NUMBER.findall(line[found.start() :]):
                    for section in filter(None, (first, last)):
                        yield f"{path.relative_to(REPO)}:{number}", section


def test_methods_document_has_the_numbered_sections() -> None:
    sections = _methods_sections()
    assert {str(n) for n in range(14)} <= sections
    assert {"0.1", "0.2", "0.4", "0.5", "7.1", "7.2", "7.3", "7.4"} <= sections
    assert {f"8.{n}" for n in range(1, 9)} <= sections


def test_every_methods_reference_in_the_code_names_a_section() -> None:
    references = list(_code_references())
    assert len(references) >= 30  # the references are found at all
    sections = _methods_sections()
    assert [f"{where}: §{section}" for where, section in references if section not in sections] == []


def _schema() -> dict[str, Any]:
    return yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


def _deref(node: Any, schema: dict[str, Any]) -> Any:
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = schema
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def _alternatives(node: Any, schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema node and the alternatives it allows (oneOf / anyOf / allOf), dereferenced."""
    node = _deref(node, schema)
    if not isinstance(node, dict):
        return []
    nodes = [node]
    for key in ("oneOf", "anyOf", "allOf"):
        for alternative in node.get(key, []) or []:
            nodes.extend(_alternatives(alternative, schema))
    return nodes


def _key_exists(key: str, schema: dict[str, Any]) -> bool:
    nodes = [schema]
    for part in key.split("."):
        children = []
        for node in (alternative for parent in nodes for alternative in _alternatives(parent, schema)):
            properties = node.get("properties") or {}
            extra = node.get("additionalProperties")
            if part == "*" and properties:
                children.extend(properties.values())  # `readers.lora.*`: every key of the section
            elif part in properties:
                children.append(properties[part])
            elif isinstance(extra, dict):
                children.append(extra)  # a named entry (`models.*`, `probes.*`)
            for pattern, child in (node.get("patternProperties") or {}).items():
                if re.search(pattern, part):
                    children.append(child)
        if not children:
            return False
        nodes = children
    return True


def _config_keys(page: Path, top_level: set[str]) -> Iterator[str]:
    for key in DOTTED.findall(_prose(page.read_text())):
        if key.split(".")[0] in top_level and key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            yield key


def test_every_config_key_the_docs_name_is_in_the_schema() -> None:
    schema = _schema()
    top_level = set(schema["properties"])
    named = {(str(page.relative_to(REPO)), key) for page in PAGES for key in _config_keys(page, top_level)}
    assert len(named) >= 50  # the pages do name keys
    assert sorted(f"{page}: {key}" for page, key in named if not _key_exists(key, schema)) == []


def test_schema_walk_tells_real_keys_from_invented_ones() -> None:
    schema = _schema()
    assert _key_exists("lenses.tuned.steps", schema) and _key_exists("steering.layers", schema)
    assert _key_exists("models.smollm2-135m.store_dtype", schema) and _key_exists("corpora.*.path", schema)
    assert not _key_exists("lenses.tuned.stepz", schema) and not _key_exists("steering.layer", schema)


def test_readme_is_short_without_its_findings_block() -> None:
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and text.index(START) < text.index(END)
    assert "\n## Findings\n" in text[: text.index(START)]
    front_door = text[: text.index(START) + len(START)] + text[text.index(END) :]
    assert len(front_door.encode()) <= README_LIMIT


def test_architecture_layout_lists_the_library_top_level() -> None:
    text = (REPO / "docs/architecture.md").read_text()
    block = text[text.index("src/latent_atlas/\n") : text.index("\ntests/", text.index("src/latent_atlas/\n"))]
    listed = set(re.findall(r"^ {3}(\w+(?:\.py|/))", block, re.MULTILINE))
    library = REPO / "src/latent_atlas"
    actual = {p.name for p in library.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in library.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert listed == actual
