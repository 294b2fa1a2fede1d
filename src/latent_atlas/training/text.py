"""Text cleaning, cutting, deduplication and split assignment for the training corpora."""

import hashlib
import math
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

_WORD = re.compile(r"\w+")
SPLITS = ("train", "validation", "test")  # the training corpora's splits, by document

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
# Splits


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


def document_id(prefix: str, name: str, n: int, k: int | None = None) -> str:
    """The id of document ``n`` of a source (``deb:x:12``), or of its piece ``k`` (``deb:x:12.3``)."""
    return f"{prefix}:{name}:{n}" if k is None else f"{prefix}:{name}:{n}.{k}"


def parent_document(doc_id: str) -> str:
    """Return the id of the document a piece was cut from (``deb:x:12.3`` -> ``deb:x:12``)."""
    head, _, last = doc_id.rpartition(":")
    return f"{head}:{last.split('.')[0]}" if head else doc_id


# --------------------------------------------------------------------------------------------------
# Balancing and counting (shared by the Debian and hub sources)


class Counted(Protocol):
    """A piece of a document with its word count and, once decided, why it was dropped."""

    words: int
    drop: str | None


class Piece(Counted, Protocol):
    """A piece with its text."""

    text: str


def mark_duplicates(
    pieces: Sequence[Piece], threshold: float, permutations: int, bands: int, shingle_words: int
) -> None:
    """Mark exact, then near duplicates of earlier pieces (in the given order): ``drop`` = the reason."""
    texts = [piece.text for piece in pieces]
    for piece, duplicate in zip(pieces, exact_duplicates(texts), strict=True):
        if duplicate and piece.drop is None:
            piece.drop = "exact_duplicate"
    near = near_duplicates(
        texts, threshold, permutations, bands, shingle_words, skip=[piece.drop is not None for piece in pieces]
    )
    for piece, duplicate in zip(pieces, near, strict=True):
        if duplicate:
            piece.drop = "near_duplicate"


class DuplicateSettings(Protocol):
    """The settings :func:`deduplicate` reads (a corpus builder's ``Settings``)."""

    near_duplicate_threshold: float
    minhash_permutations: int
    minhash_bands: int
    shingle_words: int


def deduplicate(pieces: Sequence[Piece], settings: DuplicateSettings) -> None:
    """Mark exact, then near duplicates of earlier pieces (in the given order) with ``settings``' MinHash."""
    mark_duplicates(
        pieces,
        settings.near_duplicate_threshold,
        settings.minhash_permutations,
        settings.minhash_bands,
        settings.shingle_words,
    )


def cap_documents(documents: Mapping[str, Sequence[Any]], limit: int, salt: str, reason: str) -> None:
    """Keep whole documents, in the order of a stable hash of their ids, while the words stay under ``limit``.

    ``documents`` maps a document id to its pieces (objects with ``words`` and ``drop``); the pieces of every
    document that does not fit get ``drop = reason``.
    """
    total = 0
    for document in sorted(documents, key=lambda d: (unit_hash(f"{salt}:cap:{d}"), d)):
        words = sum(piece.words for piece in documents[document])
        if total + words <= limit:
            total += words
        else:
            for piece in documents[document]:
                piece.drop = reason


@dataclass
class DocumentPiece:
    """One piece of a document on its way into a corpus table (the Debian and hub builders' pieces).

    ``n`` numbers the document in its source's stream, ``k`` the piece among its ``pieces``; ``source`` is the
    Debian source's index (0 for the hub's one stream), ``register`` the hub document's label ("" for Debian,
    whose register is its source's); ``drop`` says why the piece was dropped, once decided.
    """

    n: int
    k: int
    pieces: int
    text: str
    words: int
    source: int = 0
    register: str = ""
    drop: str | None = None

    def doc_id(self, prefix: str, name: str, whole: bool = False) -> str:
        """``prefix:name:n``, with ``.k`` for a piece of a cut document unless ``whole`` (its document's id)."""
        return document_id(prefix, name, self.n, None if whole or self.pieces == 1 else self.k)


def document_pieces(
    text: str, n: int, max_words: int, min_words: int, source: int = 0, register: str = ""
) -> list[DocumentPiece]:
    """Cut the ``n``-th (cleaned) document into pieces; pieces under ``min_words`` are marked ``too_short``."""
    parts = chunk_text(text, max_words) if text else []
    pieces = []
    for k, part in enumerate(parts):
        words = word_count(part)
        drop = "too_short" if words < min_words else None
        pieces.append(DocumentPiece(n, k, len(parts), part, words, source, register, drop))
    return pieces


def cap_pieces(
    pieces: Iterable[DocumentPiece], document: Callable[[DocumentPiece], str], limit: int, salt: str, reason: str
) -> None:
    """Keep whole documents of the kept pieces (``document`` gives a piece's document id) while words <= ``limit``.

    Documents go in the order of a stable hash of their ids (:func:`cap_documents`).
    """
    documents: dict[str, list[DocumentPiece]] = defaultdict(list)
    for piece in pieces:
        if piece.drop is None:
            documents[document(piece)].append(piece)
    cap_documents(documents, limit, salt, reason)


def tally(pieces: Iterable[Counted], splits: Iterable[str], names: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Count documents (pieces) and words, in total and per split (every split of ``names`` listed)."""
    per_split = {split: {"documents": 0, "words": 0} for split in names}
    for piece, split in zip(pieces, splits, strict=True):
        entry = per_split.setdefault(split, {"documents": 0, "words": 0})
        entry["documents"] += 1
        entry["words"] += piece.words
    return {
        "documents": sum(e["documents"] for e in per_split.values()),
        "words": sum(e["words"] for e in per_split.values()),
        "splits": per_split,
    }
