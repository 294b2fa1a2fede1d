"""Register-labelled training corpora from texts that Debian packages ship, assembled offline.

Each source in ``config/training/debian-sources.yaml`` names a Debian package, the register its text best
represents, an extractor and the files to read inside the package. :func:`assemble_corpus` fetches each
package with ``apt-get download`` (no root needed; reused when the ``.deb`` is already in the downloads
folder), unpacks it with ``dpkg-deb -x``, turns its files into documents, cleans them, cuts long ones into
pieces of at most ``max_words`` words, removes exact and near duplicates, caps the words per source and per
register, and assigns each document to ``train`` / ``validation`` / ``test`` by a stable hash of its id (all
pieces of one document land in the same split). It writes the documents table (the columns and parquet
metadata of :func:`latent_atlas.corpus.write_corpus`, so :func:`~latent_atlas.corpus.load_corpus_table`
reads it) and a manifest JSON recording each package's version, ``.deb`` sha256, licence and copyright file.

Document ids are ``deb:<source>:<n>`` for the ``n``-th document a source yields, and
``deb:<source>:<n>.<k>`` for its ``k``-th piece when it was cut; ``<source>`` is the source's ``name``
(the package name unless the config names one).
"""

import functools
import gzip
import hashlib
import math
import re
import shutil
import subprocess
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from latent_atlas.corpus import COLUMNS, write_corpus
from latent_atlas.errors import CorpusError
from latent_atlas.provenance import atomic_output, provenance_record, sha256_file, write_json

SPLITS = ("train", "validation", "test")
_WORD = re.compile(r"\w+")

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Source:
    """One Debian package (or one part of it) and how to turn its files into documents.

    Attributes:
        package: the Debian package name (``apt-get download <package>``).
        register: the label its documents get (CORE names where they fit: ``narrative``, ``how_to``, ...).
        extractor: one of :data:`EXTRACTORS`.
        paths: globs, relative to the unpacked package's root, of the files to read.
        licence: a short licence name; the full terms are in ``usr/share/doc/<package>/copyright``.
        name: the source's name in document ids and the manifest (defaults to ``package``); two sources
            reading different parts of one package need different names.
        exclude: globs (on the path relative to the package root) of files to leave out.
        options: extractor options (see each extractor).
        version: pin a package version (``apt-get download <package>=<version>``); the candidate if absent.
        max_words: keep at most this many words from this source (documents chosen by a stable hash).
    """

    package: str
    register: str
    extractor: str
    paths: tuple[str, ...]
    licence: str
    name: str = ""
    exclude: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    version: str | None = None
    max_words: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.package)


@dataclass(frozen=True)
class Settings:
    """How documents are cleaned, cut, deduplicated, balanced and split.

    Attributes:
        min_words: documents (and pieces) with fewer words are dropped.
        max_words: longer documents are cut into pieces of at most this many words, at paragraph or
            sentence boundaries where possible.
        group_words: extractors of short entries (dictionary entries, fortunes) group consecutive entries
            into one document until it has at least this many words.
        splits: fraction of documents per split, in order.
        split_salt: mixed into the split hash; change it to draw another split.
        near_duplicate_threshold: a piece whose estimated Jaccard similarity of word shingles with an
            earlier piece reaches this is dropped.
        shingle_words: words per shingle.
        minhash_permutations: MinHash signature length.
        minhash_bands: LSH bands (``minhash_permutations`` must be a multiple of it).
        max_words_per_register: cap on the words of each register, so registers are comparable.
        copyright_excerpt_lines: lines of each copyright file quoted in the manifest.
    """

    min_words: int = 20
    max_words: int = 400
    group_words: int = 300
    splits: Mapping[str, float] = field(default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05})
    split_salt: str = "latent-atlas"
    near_duplicate_threshold: float = 0.8
    shingle_words: int = 5
    minhash_permutations: int = 128
    minhash_bands: int = 32
    max_words_per_register: int | None = None
    copyright_excerpt_lines: int = 40


def parse_sources(entries: Iterable[Mapping[str, Any] | Source]) -> list[Source]:
    """Validate source entries from config, failing with a message that names the entry and the fix."""
    sources = []
    required = ("package", "register", "extractor", "paths", "licence")
    known = set(Source.__dataclass_fields__)
    for index, entry in enumerate(entries):
        if isinstance(entry, Source):
            source = entry
        else:
            if not isinstance(entry, Mapping):
                raise CorpusError(f"sources[{index}] is {entry!r}; each source is a mapping with {', '.join(required)}")
            missing = [key for key in required if not entry.get(key)]
            unknown = sorted(set(entry) - known)
            if missing or unknown:
                raise CorpusError(
                    f"sources[{index}] ({entry.get('package', '?')}): "
                    + (f"missing {', '.join(missing)}" if missing else f"unknown keys {', '.join(unknown)}")
                    + f"; a source has the keys {', '.join(sorted(known))}"
                )
            values = dict(entry)
            for key in ("paths", "exclude"):
                value = values.get(key, ())
                values[key] = (value,) if isinstance(value, str) else tuple(value)
            values["options"] = dict(values.get("options") or {})
            source = Source(**values)
        if source.extractor not in EXTRACTORS:
            raise CorpusError(
                f"source {source.name!r} has extractor {source.extractor!r}; use one of {', '.join(sorted(EXTRACTORS))}"
            )
        sources.append(source)
    names = Counter(source.name for source in sources)
    if clashes := sorted(name for name, count in names.items() if count > 1):
        raise CorpusError(f"source names {clashes} are used twice; give each source of one package its own 'name'")
    return sources


def parse_settings(values: Mapping[str, Any] | Settings | None) -> Settings:
    """Validate the ``settings`` block of the sources config."""
    if isinstance(values, Settings):
        settings = values
    else:
        values = dict(values or {})
        unknown = sorted(set(values) - set(Settings.__dataclass_fields__))
        if unknown:
            raise CorpusError(
                f"unknown settings {unknown}; the settings are {', '.join(sorted(Settings.__dataclass_fields__))}"
            )
        settings = Settings(**values)
    fractions = dict(settings.splits)
    if not fractions or any(f < 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0):
        raise CorpusError(f"settings.splits {fractions} must be non-negative fractions that sum to 1")
    if settings.minhash_permutations % settings.minhash_bands:
        raise CorpusError("settings.minhash_permutations must be a multiple of settings.minhash_bands")
    if not 0 < settings.min_words <= settings.max_words:
        raise CorpusError("settings need 0 < min_words <= max_words")
    return settings


def read_sources_config(path: str | Path) -> tuple[list[Source], Settings]:
    """Read a sources config: a mapping with ``sources`` (a list) and optional ``settings``, or a bare list."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as error:
        raise CorpusError(f"sources config {path} does not exist") from error
    except yaml.YAMLError as error:
        raise CorpusError(f"sources config {path} is not valid YAML: {error}") from error
    if isinstance(loaded, list):
        return parse_sources(loaded), parse_settings(None)
    if not isinstance(loaded, Mapping) or not isinstance(loaded.get("sources"), list):
        raise CorpusError(f"{path} must hold a list of sources, or a mapping with a 'sources' list")
    return parse_sources(loaded["sources"]), parse_settings(loaded.get("settings"))


# --------------------------------------------------------------------------------------------------
# Fetching


def _require_tool(tool: str, package: str, purpose: str) -> str:
    """Return the path of a command-line tool, or fail naming it and the Debian package that has it."""
    found = shutil.which(tool)
    if found is None:
        raise CorpusError(
            f"`{tool}` is not installed, and it is needed to {purpose}. It comes with Debian and Ubuntu "
            f"(package {package}); on other systems, place the .deb files in the downloads folder by hand "
            "and install dpkg (it is packaged for most distributions and for Homebrew)."
        )
    return found


def _find_deb(package: str, downloads: Path, version: str | None = None) -> Path | None:
    """Return the ``<package>_<version>_<arch>.deb`` already in ``downloads`` (the latest written if several)."""
    stem = f"{package}_{version.replace(':', '%3a')}_" if version else f"{package}_"
    found = [path for path in downloads.glob(f"{stem}*.deb") if path.name.count("_") == 2]
    return max(found, key=lambda path: (path.stat().st_mtime, path.name)) if found else None


def download_deb(package: str, downloads: str | Path, version: str | None = None) -> Path:
    """Return the ``.deb`` of ``package`` in ``downloads``, fetching it with ``apt-get download`` if absent.

    Needs no root: ``apt-get download`` writes into the current directory. Fetches the candidate version of
    the system's package lists (the current Debian 12 version here), or ``version`` when given. The manifest
    records the version and sha256 of the file actually used, so a reused older ``.deb`` shows there.

    Raises:
        CorpusError: naming the package and the fix when ``apt-get`` is missing, the package is unknown or
            the download fails.
    """
    downloads = Path(downloads)
    downloads.mkdir(parents=True, exist_ok=True)
    found = _find_deb(package, downloads, version)
    if found is not None:
        return found
    apt_get = _require_tool("apt-get", "apt", f"download the package {package!r}")
    target = f"{package}={version}" if version else package
    result = subprocess.run(
        [apt_get, "download", "--quiet", target], cwd=downloads, capture_output=True, text=True, check=False
    )
    found = _find_deb(package, downloads, version)
    if result.returncode != 0 or found is None:
        detail = (result.stderr or result.stdout).strip()[-800:]
        raise CorpusError(
            f"`apt-get download {target}` failed (exit {result.returncode}): {detail}\n"
            f"Check the package name (`apt-cache policy {package}`; `apt-cache search <word>` finds others), "
            "refresh the package lists (`sudo apt-get update`), or place the .deb "
            f"({package}_<version>_all.deb) in {downloads} by hand."
        )
    return found


def deb_fields(deb: str | Path) -> dict[str, str]:
    """Return the ``Package``, ``Version`` and ``Architecture`` fields of a ``.deb``'s control file."""
    dpkg_deb = _require_tool("dpkg-deb", "dpkg", f"read {Path(deb).name}")
    result = subprocess.run(
        [dpkg_deb, "--field", str(deb), "Package", "Version", "Architecture"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CorpusError(f"{deb} is not a readable .deb ({result.stderr.strip()}); delete it and run again")
    fields = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def extract_deb(deb: str | Path, into: str | Path) -> Path:
    """Unpack a ``.deb`` into the directory ``into`` with ``dpkg-deb -x`` and return it.

    The directory appears only once unpacking has succeeded; an existing one is reused as it is.
    """
    into = Path(into)
    if into.is_dir():
        return into
    dpkg_deb = _require_tool("dpkg-deb", "dpkg", f"unpack {Path(deb).name}")
    with atomic_output(into) as tmp:
        result = subprocess.run([dpkg_deb, "-x", str(deb), str(tmp)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise CorpusError(
                f"`dpkg-deb -x {deb}` failed: {result.stderr.strip()[-800:]}; delete {deb} to download it again"
            )
    return into


def select_files(root: Path, source: Source) -> list[Path]:
    """Return the regular files under ``root`` matching the source's ``paths`` and not its ``exclude``."""
    files: dict[Path, Path] = {}
    for pattern in source.paths:
        for path in sorted(root.glob(pattern)):
            relative = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file() or any(fnmatch(relative, ex) for ex in source.exclude):
                continue
            files.setdefault(path.resolve(), path)
    if not files:
        raise CorpusError(
            f"source {source.name!r}: no files in package {source.package} match {list(source.paths)}"
            f"{f' (excluding {list(source.exclude)})' if source.exclude else ''}; look inside with "
            f"`dpkg-deb -c {source.package}_*.deb` and fix 'paths'"
        )
    return list(files.values())


# --------------------------------------------------------------------------------------------------
# Extractors: files of one package -> raw documents

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


# --------------------------------------------------------------------------------------------------
# Cleaning and cutting


def word_count(text: str) -> int:
    """Return the number of whitespace-separated words."""
    return len(text.split())


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc, except the newline


def clean_text(text: str) -> str:
    """Normalise a document: overstrikes resolved, Unicode NFC, control characters removed, whitespace tidied.

    Keeps line and paragraph breaks (at most one blank line in a row); runs of spaces and tabs become one
    space and lines are stripped.
    """
    text = re.sub(r".\x08", "", text)
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\t", " ").translate(_INVISIBLE)
    text = _CONTROL.sub("", text)
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _units(text: str, max_words: int) -> Iterator[tuple[str, int, bool]]:
    """Yield ``(text, words, starts_paragraph)`` units of at most ``max_words`` words, in order."""
    for paragraph in text.split("\n\n"):
        words = word_count(paragraph)
        if words <= max_words:
            yield paragraph, words, True
            continue
        first = True
        for sentence in re.split(r"(?<=[.!?;:])\s+", paragraph):
            tokens = sentence.split()
            for start in range(0, len(tokens), max_words):
                piece = tokens[start : start + max_words]
                yield " ".join(piece), len(piece), first
                first = False


def chunk_text(text: str, max_words: int) -> list[str]:
    """Cut a document into pieces of at most ``max_words`` words, at paragraph or sentence boundaries.

    Pieces are about equally long (the word count over the number of pieces needed); a sentence longer
    than ``max_words`` is cut between words.
    """
    total = word_count(text)
    if total <= max_words:
        return [text]
    target = math.ceil(total / math.ceil(total / max_words))
    pieces: list[str] = []
    current: list[str] = []
    words = 0
    for unit, count, new_paragraph in _units(text, max_words):
        if current and (words + count > max_words or words >= target):
            pieces.append("".join(current).strip())
            current, words = [], 0
        current.append(("\n\n" if new_paragraph else " ") + unit if current else unit)
        words += count
    if current:
        pieces.append("".join(current).strip())
    return pieces


# --------------------------------------------------------------------------------------------------
# Deduplication


def normalised_key(text: str) -> str:
    """Return a hash of the text's words, case-folded (equal for texts that differ in case, spacing, punctuation)."""
    words = " ".join(_WORD.findall(unicodedata.normalize("NFC", text).casefold()))
    return hashlib.blake2b(words.encode(), digest_size=16).hexdigest()


def exact_duplicates(texts: Sequence[str]) -> list[bool]:
    """Flag every text whose normalised form equals that of an earlier text."""
    seen: set[str] = set()
    flags = []
    for text in texts:
        key = normalised_key(text)
        flags.append(key in seen)
        seen.add(key)
    return flags


class MinHasher:
    """MinHash signatures of word shingles, deterministic across runs and machines.

    Words are hashed with CRC-32, a shingle of ``shingle_words`` consecutive words is a fixed linear mix of
    its word hashes (mod 2**64), and permutation ``j`` maps a shingle ``h`` to the top 32 bits of
    ``a_j * h + b_j`` (mod 2**64) with fixed odd ``a_j``.
    """

    def __init__(self, permutations: int = 128, shingle_words: int = 5, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=permutations, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=permutations, dtype=np.uint64)
        self.mix = rng.integers(1, 2**63, size=shingle_words, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.shingle_words = shingle_words
        self._words: dict[str, int] = {}

    def shingles(self, text: str) -> np.ndarray:
        """Return the distinct shingle hashes of a text (one shingle of all words if it is shorter)."""
        words = _WORD.findall(text.casefold())
        ids = np.array([self._words.setdefault(w, zlib.crc32(w.encode()) + 1) for w in words] or [0], dtype=np.uint64)
        n = min(self.shingle_words, len(ids))
        hashes = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        for j in range(n):
            hashes += ids[j : len(ids) - n + 1 + j] * self.mix[j]
        return np.unique(hashes)

    def signature(self, text: str) -> np.ndarray:
        """Return the MinHash signature (one uint64 per permutation) of a text."""
        shingles = self.shingles(text)
        return ((shingles[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)).min(axis=0)


def near_duplicates(
    texts: Sequence[str],
    threshold: float = 0.8,
    permutations: int = 128,
    bands: int = 32,
    shingle_words: int = 5,
    skip: Sequence[bool] | None = None,
) -> list[bool]:
    """Flag every text whose estimated shingle Jaccard similarity with an earlier kept text is ``>= threshold``.

    Candidates are found by locality-sensitive hashing (``bands`` bands of the MinHash signature); a
    candidate counts when the fraction of equal signature entries reaches ``threshold``. The first text
    of a group of near duplicates is kept, so the result depends only on the order. Texts flagged in
    ``skip`` (e.g. exact duplicates) are neither checked nor kept as references.
    """
    hasher = MinHasher(permutations, shingle_words)
    rows = permutations // bands
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    kept: dict[int, np.ndarray] = {}
    flags = []
    for index, text in enumerate(texts):
        if skip is not None and skip[index]:
            flags.append(False)
            continue
        signature = hasher.signature(text)
        keys = [(band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = sorted({other for key in keys for other in buckets.get(key, ())})
        duplicate = any(float(np.mean(kept[other] == signature)) >= threshold for other in candidates)
        flags.append(duplicate)
        if not duplicate:
            kept[index] = signature
            for key in keys:
                buckets[key].append(index)
    return flags


# --------------------------------------------------------------------------------------------------
# Splits and balance


def unit_hash(text: str) -> float:
    """Map a string to [0, 1) deterministically (sha256-based, unlike Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def assign_split(document_id: str, fractions: Mapping[str, float], salt: str = "") -> str:
    """Return the split of a document from a stable hash of its id: the same id always gets the same split."""
    u = unit_hash(f"{salt}:split:{document_id}")
    cumulative = 0.0
    for split, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return split
    return next(reversed(list(fractions)))


def parent_document(doc_id: str) -> str:
    """Return the id of the document a piece was cut from (``deb:x:12.3`` -> ``deb:x:12``)."""
    head, _, last = doc_id.rpartition(":")
    return f"{head}:{last.split('.')[0]}" if head else doc_id


@dataclass
class _Piece:
    """One piece of a document on its way into the table."""

    source: int
    n: int
    k: int
    pieces: int
    text: str
    words: int
    drop: str | None = None

    def doc_id(self, name: str) -> str:
        return f"deb:{name}:{self.n}" if self.pieces == 1 else f"deb:{name}:{self.n}.{self.k}"


def _cap(pieces: list[_Piece], names: Sequence[str], limit: int, salt: str, reason: str) -> None:
    """Keep whole documents, in the order of a stable hash of their ids, while the words stay under ``limit``."""
    documents: dict[str, list[_Piece]] = defaultdict(list)
    for piece in pieces:
        if piece.drop is None:
            documents[f"deb:{names[piece.source]}:{piece.n}"].append(piece)
    total = 0
    for document in sorted(documents, key=lambda d: (unit_hash(f"{salt}:cap:{d}"), d)):
        words = sum(piece.words for piece in documents[document])
        if total + words <= limit:
            total += words
        else:
            for piece in documents[document]:
                piece.drop = reason


# --------------------------------------------------------------------------------------------------
# Assembly


def _copyright(root: Path, package: str, lines: int) -> dict[str, Any]:
    """Describe ``usr/share/doc/<package>/copyright``: where it is, its sha256, first lines, declared licences.

    ``licences_declared`` lists the ``License:`` names of a machine-readable (DEP-5) copyright file; it is empty
    for a free-form one, whose terms are only in the text.
    """
    relative = f"usr/share/doc/{package}/copyright"
    path = root / relative
    if not path.is_file():
        return {"copyright_file": None, "copyright_excerpt": None, "licences_declared": []}
    text = path.read_text(encoding="utf-8", errors="replace")
    machine_readable = text.startswith("Format:")  # DEP-5; free-form files have no License: fields to trust
    found = re.findall(r"^License:[ \t]*(\S[^\n]*)$", text, flags=re.MULTILINE) if machine_readable else []
    declared = sorted({licence.strip() for licence in found})
    return {
        "copyright_file": relative,
        "copyright_path": str(path.resolve()),
        "copyright_sha256": sha256_file(path),
        "copyright_excerpt": "\n".join(text.splitlines()[:lines]),
        "licences_declared": declared,
    }


def _fetch(source: Source, downloads: Path, settings: Settings) -> tuple[list[str], dict[str, Any]]:
    """Download and unpack a source's package, run its extractor; return raw documents and package facts."""
    deb = download_deb(source.package, downloads, source.version)
    fields = deb_fields(deb)
    root = extract_deb(deb, downloads / "extracted" / deb.stem)
    files = select_files(root, source)
    options = {"group_words": settings.group_words, **source.options}
    try:
        documents = list(EXTRACTORS[source.extractor](files, options))
    except CorpusError as error:
        raise CorpusError(f"source {source.name!r} ({source.package}): {error}") from error
    facts = {
        "package": source.package,
        "version": fields.get("Version"),
        "architecture": fields.get("Architecture"),
        "deb": deb.name,
        "deb_bytes": deb.stat().st_size,
        "deb_sha256": sha256_file(deb),
        "licence": source.licence,
        **_copyright(root, source.package, settings.copyright_excerpt_lines),
        "register": source.register,
        "extractor": source.extractor,
        "paths": list(source.paths),
        "exclude": list(source.exclude),
        "options": dict(source.options),
        "files": [path.relative_to(root).as_posix() for path in files],
        "documents_extracted": len(documents),
    }
    return documents, facts


def build_pieces(documents: Sequence[str], source: int, settings: Settings) -> list[_Piece]:
    """Clean raw documents and cut them into pieces; pieces under ``min_words`` are marked ``too_short``."""
    pieces = []
    for n, raw in enumerate(documents):
        text = clean_text(raw)
        parts = chunk_text(text, settings.max_words) if text else []
        for k, part in enumerate(parts):
            words = word_count(part)
            drop = "too_short" if words < settings.min_words else None
            pieces.append(_Piece(source, n, k, len(parts), part, words, drop))
    return pieces


def assemble_corpus(
    sources: Sequence[Source | Mapping[str, Any]],
    settings: Settings | Mapping[str, Any] | None,
    downloads: str | Path,
    out_parquet: str | Path,
    out_manifest: str | Path,
) -> dict[str, Any]:
    """Build the corpus table and its manifest from Debian packages.

    Args:
        sources: the sources (parsed or as config mappings), in the order they take in the table; when
            two pieces are duplicates, the one of the earlier source is kept.
        settings: cleaning, cutting, deduplication, balance and split settings.
        downloads: where ``.deb`` files are kept between runs (and unpacked, under ``extracted/``).
        out_parquet: the documents table (written atomically, with provenance metadata).
        out_manifest: the manifest JSON (written atomically).

    Returns:
        The manifest.
    """
    parsed = parse_sources(sources)
    settings = parse_settings(settings)
    downloads = Path(downloads)
    names = [source.name for source in parsed]
    pieces: list[_Piece] = []
    facts: dict[str, dict[str, Any]] = {}
    for index, source in enumerate(parsed):
        documents, facts[source.name] = _fetch(source, downloads, settings)
        pieces.extend(build_pieces(documents, index, settings))

    texts = [piece.text for piece in pieces]
    for piece, duplicate in zip(pieces, exact_duplicates(texts), strict=True):
        if duplicate and piece.drop is None:
            piece.drop = "exact_duplicate"
    near = near_duplicates(
        texts,
        settings.near_duplicate_threshold,
        settings.minhash_permutations,
        settings.minhash_bands,
        settings.shingle_words,
        skip=[piece.drop is not None for piece in pieces],
    )
    for piece, duplicate in zip(pieces, near, strict=True):
        if duplicate:
            piece.drop = "near_duplicate"
    for index, source in enumerate(parsed):
        if source.max_words:
            own = [piece for piece in pieces if piece.source == index]
            _cap(own, names, source.max_words, settings.split_salt, "source_cap")
    if settings.max_words_per_register:
        for register in sorted({source.register for source in parsed}):
            members = [piece for piece in pieces if parsed[piece.source].register == register]
            _cap(members, names, settings.max_words_per_register, settings.split_salt, "register_cap")

    kept = [piece for piece in pieces if piece.drop is None]
    if not kept:
        raise CorpusError("no documents are left after cleaning and deduplication; check the sources and min_words")
    ids = [piece.doc_id(names[piece.source]) for piece in kept]
    splits = [assign_split(parent_document(doc_id), settings.splits, settings.split_salt) for doc_id in ids]
    table = pl.DataFrame(
        {
            "doc_id": ids,
            "text": [piece.text for piece in kept],
            "label": [parsed[piece.source].register for piece in kept],
            "split": splits,
            "source": [parsed[piece.source].package for piece in kept],
        },
        schema=dict.fromkeys(COLUMNS, pl.String),
    )
    spec = {"kind": "debian-packages", "sources": [asdict(s) for s in parsed], "settings": asdict(settings)}
    meta = write_corpus(table, out_parquet, spec)
    manifest = _manifest(parsed, settings, pieces, kept, splits, facts, meta, Path(out_parquet))
    write_json(out_manifest, manifest)
    return manifest


def _tally(pieces: Iterable[_Piece], splits: Iterable[str]) -> dict[str, Any]:
    """Count documents (pieces) and words, in total and per split."""
    per_split = {split: {"documents": 0, "words": 0} for split in SPLITS}
    for piece, split in zip(pieces, splits, strict=True):
        entry = per_split.setdefault(split, {"documents": 0, "words": 0})
        entry["documents"] += 1
        entry["words"] += piece.words
    return {
        "documents": sum(e["documents"] for e in per_split.values()),
        "words": sum(e["words"] for e in per_split.values()),
        "splits": per_split,
    }


def _manifest(
    sources: Sequence[Source],
    settings: Settings,
    pieces: Sequence[_Piece],
    kept: Sequence[_Piece],
    splits: Sequence[str],
    facts: Mapping[str, dict[str, Any]],
    meta: Mapping[str, Any],
    out_parquet: Path,
) -> dict[str, Any]:
    """Describe the corpus: per source (package, version, sha256, licence, counts), per register, totals."""
    per_source: dict[str, Any] = {}
    for index, source in enumerate(sources):
        own = [piece for piece in pieces if piece.source == index]
        mine = [(piece, split) for piece, split in zip(kept, splits, strict=True) if piece.source == index]
        dropped = Counter(piece.drop for piece in own if piece.drop)
        per_source[source.name] = {
            **facts[source.name],
            "pieces": len(own),
            "words_extracted": sum(piece.words for piece in own),
            "dropped": {reason: dropped.get(reason, 0) for reason in sorted(dropped)},
            **_tally((p for p, _ in mine), (s for _, s in mine)),
        }
    registers: dict[str, Any] = {}
    for register in sorted({source.register for source in sources}):
        mine = [(p, s) for p, s in zip(kept, splits, strict=True) if sources[p.source].register == register]
        registers[register] = {
            "sources": [source.name for source in sources if source.register == register],
            **_tally((p for p, _ in mine), (s for _, s in mine)),
        }
    total_debs = {facts[s.name]["deb"]: facts[s.name]["deb_bytes"] for s in sources}
    return {
        "corpus": out_parquet.name,
        "corpus_sha256": meta["corpus_sha256"],
        "columns": list(COLUMNS),
        "document_ids": "deb:<source>:<n> for the n-th document of a source; deb:<source>:<n>.<k> for its k-th "
        "piece; all pieces of a document share its split",
        "sources": per_source,
        "registers": registers,
        "totals": {**_tally(kept, splits), "deb_bytes": sum(total_debs.values())},
        "settings": asdict(settings),
        "provenance": provenance_record({"sources": [asdict(s) for s in sources], "settings": asdict(settings)}),
    }
