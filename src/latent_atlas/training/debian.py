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

import math
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from latent_atlas.corpus import COLUMNS, write_corpus
from latent_atlas.errors import CorpusError
from latent_atlas.provenance import atomic_output, provenance_record, sha256_file, write_json
from latent_atlas.training.extractors import EXTRACTORS
from latent_atlas.training.text import (
    DocumentPiece,
    assign_split,
    cap_pieces,
    clean_text,
    deduplicate,
    document_pieces,
    parent_document,
    tally,
)

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
        _check_setting_types(values)
        settings = Settings(**values)
    fractions = dict(settings.splits)
    if not fractions or any(f < 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0):
        raise CorpusError(f"settings.splits {fractions} must be non-negative fractions that sum to 1")
    if settings.minhash_permutations % settings.minhash_bands:
        raise CorpusError("settings.minhash_permutations must be a multiple of settings.minhash_bands")
    if not 0 < settings.min_words <= settings.max_words:
        raise CorpusError("settings need 0 < min_words <= max_words")
    if not 0 < settings.near_duplicate_threshold <= 1:
        threshold = settings.near_duplicate_threshold
        raise CorpusError(f"settings.near_duplicate_threshold is {threshold}; use a value in (0, 1]")
    if settings.max_words_per_register is not None and settings.max_words_per_register < 1:
        raise CorpusError("settings.max_words_per_register must be at least 1 (or null: no cap)")
    return settings


def _check_setting_types(values: Mapping[str, Any]) -> None:
    """Refuse a setting of the wrong type (a quoted number, say) by name, rather than with a TypeError later."""
    for name, value in values.items():
        expected = _SETTING_TYPES.get(name)
        if expected is None:
            continue
        kinds, wanted = expected
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise CorpusError(f"settings.{name} is {value!r} ({type(value).__name__}); give {wanted}")


_INTEGER = ((int,), "a whole number")
_SETTING_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "min_words": _INTEGER,
    "max_words": _INTEGER,
    "group_words": _INTEGER,
    "shingle_words": _INTEGER,
    "minhash_permutations": _INTEGER,
    "minhash_bands": _INTEGER,
    "copyright_excerpt_lines": _INTEGER,
    "max_words_per_register": ((int, type(None)), "a whole number or null"),
    "near_duplicate_threshold": ((int, float), "a number in (0, 1]"),
    "split_salt": ((str,), "a string"),
}


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


def sources_for_registers(sources: Sequence[Source], registers: Sequence[str], where: str) -> list[Source]:
    """The sources of the given registers (a family need not fetch what it never reads).

    Raises:
        CorpusError: naming each register no source provides.
    """
    chosen = [source for source in sources if source.register in registers]
    missing = sorted(set(registers) - {source.register for source in chosen})
    if missing:
        known = sorted({source.register for source in sources})
        raise CorpusError(
            f"training.registers names {missing}, which no source in {where} provides (its registers: "
            f"{', '.join(known)}); add a source for it or remove it from training.registers"
        )
    return chosen


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


def build_pieces(documents: Sequence[str], source: int, settings: Settings) -> list[DocumentPiece]:
    """Clean raw documents and cut them into pieces; pieces under ``min_words`` are marked ``too_short``."""
    return [
        piece
        for n, raw in enumerate(documents)
        for piece in document_pieces(clean_text(raw), n, settings.max_words, settings.min_words, source=source)
    ]


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
    pieces: list[DocumentPiece] = []
    facts: dict[str, dict[str, Any]] = {}
    for index, source in enumerate(parsed):
        documents, facts[source.name] = _fetch(source, downloads, settings)
        pieces.extend(build_pieces(documents, index, settings))

    deduplicate(pieces, settings)

    def document(piece: DocumentPiece) -> str:
        return piece.doc_id("deb", names[piece.source], whole=True)

    for index, source in enumerate(parsed):
        if source.max_words:
            own = [piece for piece in pieces if piece.source == index]
            cap_pieces(own, document, source.max_words, settings.split_salt, "source_cap")
    if settings.max_words_per_register:
        for register in sorted({source.register for source in parsed}):
            members = [piece for piece in pieces if parsed[piece.source].register == register]
            cap_pieces(members, document, settings.max_words_per_register, settings.split_salt, "register_cap")

    kept = [piece for piece in pieces if piece.drop is None]
    if not kept:
        raise CorpusError("no documents are left after cleaning and deduplication; check the sources and min_words")
    ids = [piece.doc_id("deb", names[piece.source]) for piece in kept]
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
    with atomic_output(out_parquet) as tmp_corpus, atomic_output(out_manifest) as tmp_manifest:
        meta = write_corpus(table, tmp_corpus, spec)  # both files appear together, or neither
        manifest = _manifest(parsed, settings, pieces, kept, splits, facts, meta, Path(out_parquet))
        write_json(tmp_manifest, manifest)
    return manifest


def _manifest(
    sources: Sequence[Source],
    settings: Settings,
    pieces: Sequence[DocumentPiece],
    kept: Sequence[DocumentPiece],
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
            **tally((p for p, _ in mine), (s for _, s in mine)),
        }
    registers: dict[str, Any] = {}
    for register in sorted({source.register for source in sources}):
        mine = [(p, s) for p, s in zip(kept, splits, strict=True) if sources[p.source].register == register]
        registers[register] = {
            "sources": [source.name for source in sources if source.register == register],
            **tally((p for p, _ in mine), (s for _, s in mine)),
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
        "totals": {**tally(kept, splits), "deb_bytes": sum(total_debs.values())},
        "settings": asdict(settings),
        "provenance": provenance_record({"sources": [asdict(s) for s in sources], "settings": asdict(settings)}),
    }
