"""The family's tokenizer and each member's packed training sequences.

:func:`train_tokenizer` learns a byte-level BPE on the training split of the family's registers (so every
member shares it and no text is out of vocabulary); :func:`tokenize_corpus` turns every (split, register)
of the corpus into one stream of token ids, each document preceded by the end-of-text token (which is also
the BOS token: the one context token that evaluation scores every document after). :func:`pack_member`
draws a member's training sequences from those streams in its mixture's proportions.

Each register's stream is shuffled by document with a generator seeded by ``(seed, register, epoch)``, so
that every member reading a register reads the same documents in the same order: a member trained on one
register and one trained on a mixture see prefixes of the same stream.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from latent_atlas.errors import ConfigError

END_OF_TEXT = "<|endoftext|>"
TOKEN_DTYPE = np.int32


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as BOS, EOS and padding.

    Byte-level: every string can be encoded, and decoding gives it back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ConfigError(
            f"training.tokenizer.vocab_size is {vocab_size}: a byte-level BPE needs at least 257 entries "
            "(256 bytes and <|endoftext|>); use a few thousand"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1_000_000,
    )


def document_separator(tokenizer: Any) -> int:
    """The id that precedes every document in a stream: the tokenizer's BOS, else its EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("the family's tokenizer has neither a BOS nor an EOS token; documents cannot be separated")


@dataclass(frozen=True)
class Stream:
    """One (split, register)'s documents as token ids.

    ``ids[starts[i]:starts[i+1]]`` is document ``i`` (its separator first); ``starts`` has one more entry
    than there are documents.
    """

    ids: np.ndarray
    starts: np.ndarray

    @property
    def n_documents(self) -> int:
        """The number of documents."""
        return len(self.starts) - 1

    def document(self, index: int) -> np.ndarray:
        """Document ``index``'s ids, its separator first."""
        return self.ids[self.starts[index] : self.starts[index + 1]]


def tokenize_corpus(
    corpus: pl.DataFrame, tokenizer: Any, registers: Sequence[str], splits: Sequence[str], batch: int = 256
) -> dict[tuple[str, str], Stream]:
    """Token streams of every (split, register) of the corpus, documents in corpus order.

    Raises:
        ConfigError: if a register has no documents in a split.
    """
    separator = document_separator(tokenizer)
    streams = {}
    for split in splits:
        for register in registers:
            texts = corpus.filter((pl.col("split") == split) & (pl.col("label") == register))["text"].to_list()
            if not texts:
                present = sorted(corpus.filter(pl.col("split") == split)["label"].unique().to_list())
                raise ConfigError(
                    f"training.registers names {register!r}, which has no {split} documents in the training "
                    f"corpus (its registers: {', '.join(present)}); remove it or add a source for it"
                )
            encoded: list[list[int]] = []
            for start in range(0, len(texts), batch):
                encoded += tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
            lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
            ids = np.fromiter(
                (token for doc in encoded for token in (separator, *doc)), dtype=TOKEN_DTYPE, count=int(lengths.sum())
            )
            streams[(split, register)] = Stream(ids, np.concatenate([[0], np.cumsum(lengths)]))
    return streams


def save_streams(streams: Mapping[tuple[str, str], Stream], path: str | Path) -> None:
    """Write streams to one ``.npz`` (keys ``{split}/{register}/ids`` and ``.../starts``)."""
    arrays = {}
    for (split, register), stream in streams.items():
        arrays[f"{split}/{register}/ids"] = stream.ids
        arrays[f"{split}/{register}/starts"] = stream.starts
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_streams(path: str | Path) -> dict[tuple[str, str], Stream]:
    """Read streams written by :func:`save_streams`."""
    with np.load(path) as archive:
        keys = {name.rsplit("/", 1)[0] for name in archive.files}
        return {
            tuple(key.split("/", 1)): Stream(archive[f"{key}/ids"], archive[f"{key}/starts"])  # type: ignore[misc]
            for key in sorted(keys)
        }


def _seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's ``hash`` of strings is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def register_sequences(stream: Stream, count: int, length: int, seed: int, register: str) -> tuple[np.ndarray, int]:
    """The first ``count`` windows of ``length`` tokens of a register's shuffled stream; the epochs used.

    Each epoch shuffles the documents anew (seed ``(seed, register, epoch)``) and is cut into consecutive
    windows (a window may span documents: sequences are packed); the tail shorter than a window is dropped.
    """
    if count == 0:
        return np.zeros((0, length), dtype=np.int64), 0
    per_epoch = len(stream.ids) // length
    if per_epoch == 0:
        raise ConfigError(
            f"register {register!r} has {len(stream.ids)} training tokens, fewer than one sequence of "
            f"{length}: lower training.architecture.sequence_length or add text"
        )
    windows, epoch = [], 0
    while sum(len(w) for w in windows) < count:
        order = np.random.default_rng(_seed(seed, register, epoch)).permutation(stream.n_documents)
        shuffled = np.concatenate([stream.document(int(i)) for i in order])
        windows.append(shuffled[: per_epoch * length].reshape(per_epoch, length))
        epoch += 1
    return np.concatenate(windows)[:count].astype(np.int64), epoch


def mixture_counts(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Split ``total`` sequences over registers by weight (largest remainders; the counts sum to ``total``)."""
    exact = {register: weight * total for register, weight in weights.items()}
    counts = {register: int(np.floor(value)) for register, value in exact.items()}
    by_remainder = sorted(exact, key=lambda register: (counts[register] - exact[register], register))
    for register in by_remainder[: total - sum(counts.values())]:
        counts[register] += 1
    return counts


@dataclass(frozen=True)
class PackedData:
    """A member's sequences: ``train`` in step order, ``validation`` fixed; where they came from."""

    train: np.ndarray
    validation: np.ndarray
    train_sequences: dict[str, int]
    epochs: dict[str, int]


def pack_member(
    streams: Mapping[tuple[str, str], Stream],
    weights: Mapping[str, float],
    n_train: int,
    n_validation: int,
    length: int,
    seed: int,
) -> PackedData:
    """Draw ``n_train`` training and ``n_validation`` validation sequences in the mixture's proportions.

    Training sequences are interleaved by one permutation seeded by ``seed`` alone; validation sequences
    come from the ``validation`` split (the first windows of each register's unshuffled stream).
    """
    train_counts = mixture_counts(weights, n_train)
    parts, epochs = [], {}
    for register in sorted(weights):
        windows, used = register_sequences(streams[("train", register)], train_counts[register], length, seed, register)
        parts.append(windows)
        epochs[register] = used
    train = np.concatenate(parts)
    train = train[np.random.default_rng(_seed(seed, "order")).permutation(len(train))]
    validation_counts = mixture_counts(weights, n_validation)
    held = []
    for register in sorted(weights):
        stream = streams[("validation", register)]
        available = len(stream.ids) // length
        count = min(validation_counts[register], available)
        held.append(stream.ids[: count * length].reshape(count, length).astype(np.int64))
    return PackedData(train, np.concatenate(held), train_counts, epochs)
