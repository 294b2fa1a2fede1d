"""dictd databases (``dict-gcide``, ``dict-wn``, ``dict-foldoc``, ...): their index and entries."""

import gzip
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_atlas.errors import CorpusError
from latent_atlas.training.extractors.common import group_entries, read_text, unwrap_paragraphs
from latent_atlas.training.text import normalised_key

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
    for number, line in enumerate(read_text(index_path).splitlines(), start=1):
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

    yield from group_entries((entry for entry in entries() if entry), int(options["group_words"]))
