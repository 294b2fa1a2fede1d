"""Fortune files (``fortunes``, ...): fortunes grouped into documents."""

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_atlas.training.extractors.common import group_entries, read_text
from latent_atlas.training.text import normalised_key


def read_fortunes(path: Path) -> list[str]:
    """Split a fortune file on lines holding only ``%`` and return the non-empty fortunes."""
    text = read_text(path).replace("\r\n", "\n")
    return [part.strip("\n") for part in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE) if part.strip()]


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
        yield from group_entries(fresh, int(options["group_words"]))
