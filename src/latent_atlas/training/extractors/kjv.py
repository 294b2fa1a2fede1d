"""The King James Bible of ``bible-kjv-text``: its LZW-compressed data file, chapter by chapter."""

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_atlas.errors import CorpusError

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
