"""Format readers and extractors: the files of one Debian package -> raw documents.

:data:`EXTRACTORS` maps each extractor name a source may use (``kjv``, ``dictd``, ``man``, ``html``,
``fortunes``) to a function taking the selected files and the source's options and yielding documents.
"""

import functools
import gzip
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from latent_atlas.errors import CorpusError
from latent_atlas.training.text import normalised_key, word_count

Extractor = Callable[[Sequence[Path], Mapping[str, Any]], Iterator[str]]
EXTRACTORS: dict[str, Extractor] = {}


def extractor(name: str) -> Callable[[Extractor], Extractor]:
    """Register an extractor under ``name`` (the ``extractor`` key of a source)."""

    def register(function: Extractor) -> Extractor:
        EXTRACTORS[name] = function
        return function

    return register


def _read_text(path: Path) -> str:
    """Read a text file, gunzipping ``.gz``; UTF-8, falling back to Latin-1."""
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def unwrap_paragraphs(text: str) -> str:
    """Join hard-wrapped lines: single newlines become spaces, blank lines stay paragraph breaks."""
    paragraphs = re.split(r"\n[ \t]*\n", text)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _group(entries: Iterable[str], budget: int) -> Iterator[str]:
    """Join consecutive entries (blank line between) into documents of at least ``budget`` words."""
    batch: list[str] = []
    words = 0
    for entry in entries:
        batch.append(entry)
        words += word_count(entry)
        if words >= budget:
            yield "\n\n".join(batch)
            batch, words = [], 0
    if batch:
        yield "\n\n".join(batch)


# ---- KJV bible (bible-kjv-text) -------------------------------------------------------------------

_KJV_MAGIC = b"EC02Compressed Data File"
_KJV_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def unlzw(data: bytes, max_bits: int = 16, block_mode: bool = True) -> bytes:
    """Decompress a raw LZW stream as written by Unix ``compress`` (the ``.Z`` format, header removed).

    Codes start at 9 bits and widen up to ``max_bits``; each time the width changes (or the table is
    cleared by code 256 in block mode) the reader skips to the end of the current group of eight codes,
    as ``compress`` does.
    """
    out = bytearray()
    n_bits, max_code, limit = 9, (1 << 9) - 1, 1 << max_bits
    prefix = [0] * limit
    suffix = bytearray(range(256)) + bytearray(limit - 256)
    free = 257 if block_mode else 256
    total_bits, pos, group_start = len(data) * 8, 0, 0
    old = -1
    first = 0
    padded = data + b"\0\0\0"
    while True:
        if free > max_code:
            width = n_bits * 8
            pos = group_start + -(-(pos - group_start) // width) * width
            group_start = pos
            n_bits += 1
            max_code = limit if n_bits == max_bits else (1 << n_bits) - 1
        if pos + n_bits > total_bits:
            break
        byte = pos >> 3
        code = (int.from_bytes(padded[byte : byte + 4], "little") >> (pos & 7)) & ((1 << n_bits) - 1)
        pos += n_bits
        if old == -1:
            if code > 255:
                raise CorpusError("corrupt LZW data: the first code is not a literal")
            out.append(code)
            old = first = code
            continue
        if code == 256 and block_mode:
            width = n_bits * 8
            pos = group_start + -(-(pos - group_start) // width) * width
            group_start = pos
            free, n_bits, max_code = 256, 9, (1 << 9) - 1
            continue
        incoming = code
        stack = bytearray()
        if code >= free:
            if code > free:
                raise CorpusError(f"corrupt LZW data: code {code} before entry {free} exists")
            stack.append(first)
            code = old
        while code > 255:
            stack.append(suffix[code])
            code = prefix[code]
        first = code
        stack.append(code)
        stack.reverse()
        out += stack
        if free < limit:
            prefix[free] = old
            suffix[free] = first
            free += 1
        old = incoming
    return bytes(out)


@functools.lru_cache(maxsize=2)
def read_kjv(path: Path) -> str:
    """Return the plain text of ``bible.data`` from ``bible-kjv-text`` (Chip Chapin's Bible Retrieval System).

    The file is a 24-byte magic ``EC02Compressed Data File``, zero padding, then at byte 0x54 two
    big-endian 32-bit integers (window size, number of windows ``n``) and ``n + 1`` big-endian offsets;
    window ``i`` (``window size`` bytes of text, the last one shorter) is the raw LZW stream between
    offsets ``i`` and ``i + 1``, compressed on its own (a ``compress`` header precedes the first).
    The text is one verse per line, e.g. ``Ge1:1 In the beginning God created the heaven and the earth.``
    """
    data = path.read_bytes()
    if not data.startswith(_KJV_MAGIC) or len(data) < 0x5C:
        raise CorpusError(f"{path} is not a bible-kjv-text data file (no {_KJV_MAGIC.decode()!r} header)")
    window, count = int.from_bytes(data[0x54:0x58], "big"), int.from_bytes(data[0x58:0x5C], "big")
    offsets = [int.from_bytes(data[0x5C + 4 * i : 0x60 + 4 * i], "big") for i in range(count + 1)]
    if offsets != sorted(offsets) or offsets[-1] > len(data):
        raise CorpusError(f"{path}: the window offsets are not increasing within the file; is it truncated?")
    chunks = [unlzw(data[offsets[i] : offsets[i + 1]]) for i in range(count)]
    if any(len(chunk) != window for chunk in chunks[:-1]):
        raise CorpusError(f"{path}: a window did not decompress to {window} bytes; the file is corrupt")
    return b"".join(chunks).decode("latin-1")


@extractor("kjv")
def extract_kjv(files: Sequence[Path], options: Mapping[str, Any]) -> Iterator[str]:
    """Chapters of the King James Bible, one document each (verse numbers dropped).

    Options: ``books`` (keep only these book codes, e.g. ``[Psa, SSol]``), ``exclude_books``. The codes are
    those of the data file: Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa
    Prv Eccl SSol Isa Jer Lam Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke
    John Acts Rom 1Cor 2Cor Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev.
    """
    keep = set(options.get("books") or ())
    drop = set(options.get("exclude_books") or ())
    for path in files:
        chapter: tuple[str, str] | None = None
        verses: list[str] = []
        for line in read_kjv(path).splitlines():
            match = _KJV_VERSE.match(line)
            if not match:
                continue
            book, number, _, text = match.groups()
            if (keep and book not in keep) or book in drop:
                continue
            if (book, number) != chapter:
                if verses:
                    yield " ".join(verses)
                chapter, verses = (book, number), []
            verses.append(text.strip())
        if verses:
            yield " ".join(verses)


# ---- dictd databases (dict-gcide, dict-wn, dict-foldoc, ...) --------------------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_b64_decode(digits: str) -> int:
    """Decode a dictd index number: base-64 digits ``A-Za-z0-9+/``, most significant first (``"Bd"`` = 93)."""
    value = 0
    for digit in digits:
        if digit not in _B64:
            raise CorpusError(f"{digits!r} is not a dictd base-64 number")
        value = value * 64 + _B64[digit]
    return value


def dictd_b64_encode(value: int) -> str:
    """Encode a non-negative integer as dictd base-64 digits (the inverse of :func:`dictd_b64_decode`)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = alphabet[value % 64]
    while value >= 64:
        value //= 64
        digits = alphabet[value % 64] + digits
    return digits


def read_dictd(dict_path: Path) -> Iterator[tuple[list[str], str]]:
    """Yield ``(headwords, definition)`` of a dictd database in the order of the ``.dict`` file.

    ``dict_path`` is the ``.dict`` or gzip/dictzip-compressed ``.dict.dz`` file; its index
    (``<name>.index``, lines ``headword<TAB>offset<TAB>length`` in dictd base-64) sits next to it. Headwords
    that share one definition are yielded together; the database's own ``00-database-*`` entries are left out.
    """
    stem = dict_path.name.removesuffix(".dz").removesuffix(".dict")
    index_path = dict_path.with_name(f"{stem}.index")
    if not index_path.is_file():
        raise CorpusError(f"{dict_path} has no index {index_path.name} next to it")
    body = dict_path.read_bytes()
    if dict_path.suffix == ".dz":
        body = gzip.decompress(body)
    spans: dict[tuple[int, int], list[str]] = {}
    for number, line in enumerate(_read_text(index_path).splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise CorpusError(f"{index_path}:{number} is not 'headword<TAB>offset<TAB>length'")
        headword = parts[0]
        if re.match(r"00-?database", headword):
            continue
        span = (dictd_b64_decode(parts[1]), dictd_b64_decode(parts[2]))
        if span[0] + span[1] > len(body):
            raise CorpusError(f"{index_path}:{number} points past the end of {dict_path.name}")
        spans.setdefault(span, []).append(headword)
    for (offset, length), headwords in sorted(spans.items()):
        yield headwords, body[offset : offset + length].decode("utf-8", errors="replace")


@extractor("dictd")
def extract_dictd(files: Sequence[Path], options: Mapping[str, Any]) -> Iterator[str]:
    """Dictionary entries, grouped in file order into documents of about ``group_words`` words.

    An entry whose body (the text after its first line) repeats an earlier entry's is skipped: WordNet, for
    one, repeats each synset's definition under every synonym.

    Options: ``drop_patterns`` (regular expressions removed from each entry, e.g. source tags like
    ``[1913 Webster]``); cross-reference braces ``{...}`` are always removed, keeping their text.
    """
    patterns = [re.compile(p) for p in options.get("drop_patterns") or ()]
    seen: set[str] = set()

    def entries() -> Iterator[str]:
        for path in files:
            if path.name.endswith(".index"):
                continue
            for _, definition in read_dictd(path):
                body = definition.strip("\n").partition("\n")[2]
                key = normalised_key(body or definition)
                if key in seen:
                    continue
                seen.add(key)
                for pattern in patterns:
                    definition = pattern.sub("", definition)
                yield unwrap_paragraphs(definition.replace("{", "").replace("}", ""))

    yield from _group((entry for entry in entries() if entry), int(options["group_words"]))


# ---- man pages (manpages, ...) --------------------------------------------------------------------

_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "Lq": "„", "bq": "‚", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "co": "©",
    "rg": "®", "tm": "™", "de": "°", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠",
    "==": "≡", "~~": "≈", "->": "→", "<-": "←", "<>": "↔", "ua": "↑", "da": "↓", "rA": "⇒", "lA": "⇐",
    "hA": "⇔", "rs": "\\", "sl": "/", "ti": "~", "ha": "^", "ga": "`", "aa": "´", "ul": "_", "ba": "|",
    "br": "│", "or": "|", "sc": "§", "ps": "¶", "dg": "†", "dd": "‡", "ct": "¢", "Po": "£", "Ye": "¥",
    "Eu": "€", "eu": "€", "fm": "′", "sd": "″", "pc": "·", "ci": "○", "sq": "□", "ss": "ß", "r!": "¡",
    "r?": "¿", "12": "½", "14": "¼", "34": "¾", "S1": "¹", "S2": "²", "S3": "³", "**": "∗", "pl": "+",
    "eq": "=", "lh": "☜", "rh": "☞", "OK": "✓", "ff": "ff", "fi": "fi", "fl": "fl", "em-dash": "—",
}  # fmt: skip
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "S": "", "B": "", "I": "", "aq": "'"}
_CHAR_ESCAPES = {"-": "-", "e": "\\", "E": "\\", "\\": "\\", ".": ".", " ": " ", "~": " ", "0": " ", "t": " ",
                 "'": "'", "`": "`", "_": "_", "c": "\x01"}  # fmt: skip
_ESCAPE = re.compile(
    r"""\\(?:
        (?P<comment>["\#].*)
      | f(?:\[[^\]]*\]|\(..|.)
      | s(?:[+-]?\(\d\d|\[[^\]]*\]|'[^']*'|[+-]?\d)
      | \*(?:\[(?P<string_long>[^\]]*)\]|\((?P<string2>..)|(?P<string1>.))
      | n[+-]?(?:\[[^\]]*\]|\(..|.)
      | [gkm](?:\[[^\]]*\]|\(..|.)
      | \$(?:\[[^\]]*\]|\(..|.)
      | N'(?P<number>\d+)'
      | C'(?P<named>[^']*)'
      | [hvwlLoDbxXZRSHAB]'[^']*'
      | \((?P<glyph2>..)
      | \[(?P<glyph>[^\]]*)\]
      | (?P<char>.)
    )""",
    re.VERBOSE,
)
_FONT_ALTERNATION = {"BR", "RB", "BI", "IB", "IR", "RI"}
_BREAKS = {"PP", "LP", "P", "sp", "br", "HP", "RS", "RE", "in", "ti", "YS", "PD", "bp", "ne"}


def _glyph(name: str) -> str:
    """Return the character of a groff glyph name (``em``, ``u00E9``, ``'e``), or ``""`` if unknown."""
    if name in _GLYPHS:
        return _GLYPHS[name]
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16))
    accents = {"'": "\u0301", "`": "\u0300", ":": "\u0308", "^": "\u0302", "~": "\u0303", ",": "\u0327"}
    if len(name) == 2 and name[0] in accents and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + accents[name[0]])
    return ""


def _unescape(match: re.Match[str]) -> str:
    """Replace one groff escape sequence by the text it prints."""
    groups = match.groupdict()
    if groups["comment"] is not None:
        return ""
    for key in ("string_long", "string2", "string1"):
        if groups[key] is not None:
            return _STRINGS.get(groups[key], "")
    if groups["number"] is not None:
        return chr(int(groups["number"]))
    for key in ("named", "glyph2", "glyph"):
        if groups[key] is not None:
            return _glyph(groups[key])
    if groups["char"] is not None:
        return _CHAR_ESCAPES.get(groups["char"], "")
    return ""


def groff_unescape(text: str) -> str:
    """Replace groff escapes (fonts, glyphs, strings, comments, spacing) in one line by plain text."""
    return _ESCAPE.sub(_unescape, text)


def _macro_args(rest: str) -> list[str]:
    """Split the arguments of a request line the way groff does (double quotes group, ``""`` is a quote)."""
    args, i = [], 0
    while i < len(rest):
        if rest[i] in " \t":
            i += 1
            continue
        if rest[i] == '"':
            j, chars = i + 1, []
            while j < len(rest):
                if rest[j] == '"':
                    if rest[j + 1 : j + 2] == '"':
                        chars.append('"')
                        j += 2
                        continue
                    j += 1
                    break
                chars.append(rest[j])
                j += 1
            args.append("".join(chars))
        else:
            j = i
            while j < len(rest) and rest[j] not in " \t":
                j += 2 if rest[j] == "\\" else 1
            args.append(rest[i:j])
        i = j
    return [groff_unescape(arg) for arg in args]


class _ManText:
    """Accumulates the paragraphs of a man page while :func:`groff_to_text` walks its lines."""

    def __init__(self, drop_sections: set[str]) -> None:
        self.paragraphs: list[str] = []
        self.lines: list[str] = []
        self.drop_sections = drop_sections
        self.skipping = False
        self.tag_pending = False
        self.heading_pending = False

    def flush(self) -> None:
        text = " ".join(self.lines).replace("\x01 ", "").replace("\x01", "")
        if text.strip():
            self.paragraphs.append(" ".join(text.split()))
        self.lines = []

    def heading(self, text: str) -> None:
        self.flush()
        self.heading_pending = False
        self.skipping = " ".join(text.upper().split()) in self.drop_sections
        if not self.skipping:
            self.paragraphs.append(" ".join(text.split()))

    def emit(self, text: str) -> None:
        if self.heading_pending:
            self.heading(text)
        elif self.skipping:
            return
        elif self.tag_pending:
            self.flush()
            self.lines.append(text)
            if any(ch.isalnum() for ch in text):  # a term: its own paragraph; a bullet: leads the body
                self.flush()
            self.tag_pending = False
        elif text.strip():
            self.lines.append(text)
        else:
            self.flush()

    def block(self, lines: list[str]) -> None:
        self.flush()
        if not self.skipping and any(line.strip() for line in lines):
            self.paragraphs.append("\n".join(line.rstrip() for line in lines).strip("\n"))


def _request_name(line: str) -> str:
    """Return the name of the request on a control line (``.SH NAME`` -> ``SH``)."""
    return line[1:].strip().partition(" ")[0]


def groff_to_text(source: str, drop_sections: Iterable[str] = (), keep_code: bool = False) -> str:
    """Convert a man page's groff source (``man`` macros) to plain text, in Python (no groff needed).

    Headings, paragraphs and list tags become paragraphs; font changes, glyph escapes, comments, macro
    definitions, conditionals and tables are removed. Example blocks (``.EX``/``.nf``) are kept as
    separate paragraphs only with ``keep_code``. A page that only includes another (``.so``) gives ``""``.

    Args:
        source: the page source.
        drop_sections: section headings (any case) whose text is left out, e.g. ``SEE ALSO``.
        keep_code: keep example and no-fill blocks.
    """
    out = _ManText({" ".join(s.upper().split()) for s in drop_sections})
    lines = source.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith((".", "'")):
            out.emit(groff_unescape(line))
            continue
        name = _request_name(line)
        rest = line[1:].strip()[len(name) :].strip()
        if not name or name.startswith(('\\"', "\\#")):
            continue
        if name == "so":
            return ""
        if name in ("de", "de1", "am", "ig"):
            while i < len(lines) and not lines[i].startswith(".."):
                i += 1
            i += 1
        elif name in ("if", "ie", "el", "while"):
            depth = line.count("\\{") - line.count("\\}")
            while depth > 0 and i < len(lines):
                depth += lines[i].count("\\{") - lines[i].count("\\}")
                i += 1
        elif name == "TS":
            while i < len(lines) and not lines[i].startswith(".TE"):
                i += 1
            i += 1
        elif name in ("EX", "nf"):
            end = ("EE",) if name == "EX" else ("fi",)
            block = []
            while i < len(lines) and not (lines[i].startswith((".", "'")) and _request_name(lines[i]) in end):
                if not lines[i].startswith((".", "'")):
                    block.append(groff_unescape(lines[i]))
                i += 1
            i += 1
            if keep_code:
                out.block(block)
            else:
                out.flush()
        elif name in ("SH", "SS"):
            args = _macro_args(rest)
            if args:
                out.heading(" ".join(args))
            else:
                out.flush()
                out.heading_pending = True
        elif name in ("TP", "TQ"):
            out.flush()
            out.tag_pending = True
        elif name == "IP":
            out.flush()
            args = _macro_args(rest)
            if args and args[0].strip():
                out.emit(args[0])
        elif name in ("B", "I", "SM", "SB", "CW"):
            args = _macro_args(rest)
            if args:
                out.emit(" ".join(args))
        elif name in _FONT_ALTERNATION:
            out.emit("".join(_macro_args(rest)))
        elif name in ("UE", "ME"):
            tail = "".join(_macro_args(rest))
            if out.lines and tail:
                out.lines[-1] += tail
        elif name == "SY":
            out.flush()
            out.emit(" ".join(_macro_args(rest)))
        elif name == "OP":
            out.emit("[" + " ".join(_macro_args(rest)) + "]")
        elif name in _BREAKS:
            out.flush()
        # every other request (TH, UR, MT, ft, ad, hy, ds, nr, ...) prints nothing
    out.flush()
    return "\n\n".join(out.paragraphs)


@extractor("man")
def extract_man(files: Sequence[Path], options: Mapping[str, Any]) -> Iterator[str]:
    """Man pages (groff source, plain or ``.gz``), one document per page.

    Options: ``drop_sections`` (headings to leave out, e.g. ``[SEE ALSO, COLOPHON]``), ``keep_code``
    (keep example blocks; default false).
    """
    for path in files:
        text = groff_to_text(
            _read_text(path), options.get("drop_sections") or (), keep_code=bool(options.get("keep_code", False))
        )
        if text:
            yield text


# ---- HTML documentation (python3.11-doc, debian-reference-en, ...) --------------------------------

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


@extractor("html")
def extract_html(files: Sequence[Path], options: Mapping[str, Any]) -> Iterator[str]:
    """HTML pages, one document per page (long pages are cut into pieces later).

    Options: ``content`` (class, id or role of the element holding the text, e.g. ``body`` for Sphinx),
    ``skip_classes`` (added to :data:`HTML_SKIP_CLASSES`), ``keep_code`` (keep ``<pre>`` blocks; default false).
    """
    skip = set(HTML_SKIP_CLASSES) | set(options.get("skip_classes") or ())
    for path in files:
        text = html_to_text(_read_text(path), options.get("content"), skip, bool(options.get("keep_code", False)))
        if text:
            yield text


# ---- fortunes ---------------------------------------------------------------------------------------


def read_fortunes(path: Path) -> list[str]:
    """Split a fortune file on lines holding only ``%`` and return the non-empty fortunes."""
    text = _read_text(path).replace("\r\n", "\n")
    return [part.strip("\n") for part in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE) if part.strip()]


@extractor("fortunes")
def extract_fortunes(files: Sequence[Path], options: Mapping[str, Any]) -> Iterator[str]:
    """Fortunes, grouped (per file, in order) into documents of about ``group_words`` words; line breaks kept.

    The offensive collection (files in a directory named ``off``, as in ``usr/share/games/fortunes/off/``)
    and the binary ``.dat`` indexes are always skipped, whatever the globs say. A fortune that appeared
    earlier in the source is skipped.
    """
    seen: set[str] = set()
    for path in files:
        if path.parent.name == "off" or path.suffix == ".dat":
            continue
        fresh = []
        for fortune in read_fortunes(path):
            key = normalised_key(fortune)
            if key not in seen:
                seen.add(key)
                fresh.append(fortune)
        yield from _group(fresh, int(options["group_words"]))
