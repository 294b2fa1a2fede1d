"""What the format modules share: the extractor's signature and reading, unwrapping and grouping text."""

import gzip
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_atlas.training.text import word_count

Extractor = Callable[[Sequence[Path], Mapping[str, Any]], Iterator[str]]


def read_text(path: Path) -> str:
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


def group_entries(entries: Iterable[str], budget: int) -> Iterator[str]:
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
