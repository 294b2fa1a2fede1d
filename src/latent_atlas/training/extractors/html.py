"""HTML documentation (``python3.11-doc``, ``debian-reference-en``, ...): the main content as text."""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from latent_atlas.training.extractors.common import read_text

_HTML_BLOCKS = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd",
                "ul", "ol", "dl", "table", "tr", "pre", "blockquote", "title", "caption", "figcaption", "td",
                "th", "body", "aside"}  # fmt: skip
_HTML_SKIP_TAGS = {"script", "style", "head", "nav", "header", "footer", "noscript", "svg", "form", "button",
                   "select", "textarea", "template"}  # fmt: skip
_HTML_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr",
              "param"}  # fmt: skip
HTML_SKIP_CLASSES = ("navheader", "navfooter", "sphinxsidebar", "related", "footer", "headerlink", "toc",
                     "breadcrumbs", "navigation", "mobile-nav", "skip-link")  # fmt: skip


class _HTMLText(HTMLParser):
    """Collects the paragraphs of an HTML page's content, leaving out navigation and (optionally) code."""

    def __init__(self, content: str | None, skip_classes: set[str], keep_code: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.content, self.skip_classes, self.keep_code = content, skip_classes, keep_code
        self.stack: list[tuple[str, bool, bool]] = []
        self.skip_depth = self.content_depth = self.pre_depth = 0
        self.paragraphs: list[str] = []
        self.parts: list[str] = []
        self.block_is_pre = False

    def flush(self) -> None:
        text = "".join(self.parts)
        if self.block_is_pre:
            text = "\n".join(line.rstrip() for line in text.strip("\n").split("\n"))
        else:
            text = " ".join(text.split())
        if text.strip():
            self.paragraphs.append(text)
        self.parts = []
        self.block_is_pre = self.pre_depth > 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HTML_VOID:
            if tag in ("br", "hr"):
                self.flush()
            return
        values = {key: value or "" for key, value in attrs}
        classes = set(values.get("class", "").split())
        skip = (
            tag in _HTML_SKIP_TAGS
            or bool(classes & self.skip_classes)
            or values.get("role") == "navigation"
            or (tag == "pre" and not self.keep_code)
        )
        inside = self.content is not None and (
            self.content in classes or values.get("id") == self.content or values.get("role") == self.content
        )
        if tag in _HTML_BLOCKS:
            self.flush()
        self.stack.append((tag, skip, inside))
        self.skip_depth += skip
        self.content_depth += inside
        if tag == "pre":
            self.pre_depth += 1
            self.block_is_pre = True

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_VOID or all(open_tag != tag for open_tag, _, _ in self.stack):
            return
        if tag in _HTML_BLOCKS:
            self.flush()
        while self.stack:
            open_tag, skip, inside = self.stack.pop()
            self.skip_depth -= skip
            self.content_depth -= inside
            if open_tag == "pre":
                self.pre_depth -= 1
            if open_tag == tag:
                break
        self.block_is_pre = self.pre_depth > 0

    def handle_data(self, data: str) -> None:
        if self.skip_depth == 0 and (self.content is None or self.content_depth > 0):
            self.parts.append(data)


def html_to_text(
    html: str, content: str | None = None, skip_classes: Iterable[str] = HTML_SKIP_CLASSES, keep_code: bool = False
) -> str:
    """Convert an HTML page to paragraphs of plain text (block elements become paragraphs).

    Args:
        html: the page.
        content: keep only text inside elements with this class, id or role (e.g. ``body`` for Sphinx pages);
            the whole page when ``None``.
        skip_classes: elements with any of these classes are left out (navigation, sidebars, tables of contents).
        keep_code: keep ``<pre>`` blocks (left out by default).
    """
    parser = _HTMLText(content, set(skip_classes), keep_code)
    parser.feed(html)
    parser.close()
    parser.flush()
    return "\n\n".join(parser.paragraphs)


def extract_html(files: Sequence[Path], options: Mapping[str, Any]) -> Iterator[str]:
    """HTML pages, one document per page (long pages are cut into pieces later).

    Options: ``content`` (class, id or role of the element holding the text, e.g. ``body`` for Sphinx),
    ``skip_classes`` (added to :data:`HTML_SKIP_CLASSES`), ``keep_code`` (keep ``<pre>`` blocks; default false).
    """
    skip = set(HTML_SKIP_CLASSES) | set(options.get("skip_classes") or ())
    for path in files:
        text = html_to_text(read_text(path), options.get("content"), skip, bool(options.get("keep_code", False)))
        if text:
            yield text
