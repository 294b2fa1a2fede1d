"""Man pages (``manpages``, ...): groff source to plain text."""

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_atlas.training.extractors.common import read_text

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


def extract_man(files: Sequence[Path], options: Mapping[str, Any]) -> Iterator[str]:
    """Man pages (groff source, plain or ``.gz``), one document per page.

    Options: ``drop_sections`` (headings to leave out, e.g. ``[SEE ALSO, COLOPHON]``), ``keep_code``
    (keep example blocks; default false).
    """
    for path in files:
        text = groff_to_text(
            read_text(path), options.get("drop_sections") or (), keep_code=bool(options.get("keep_code", False))
        )
        if text:
            yield text
