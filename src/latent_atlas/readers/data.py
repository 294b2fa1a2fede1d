"""What the readers read: one vector per document, and labelled splits of a task.

Every method reads a text up to its first ``max_tokens`` tokens, through one of two inputs:

``raw``: the state of the text alone, from the activation store. The store holds every position of every
    document (causal models: the state at position t depends on tokens 0..t only), so the state at position
    ``max_tokens - 1`` is exactly what the model computes for the truncated text.
``template``: the state at the task template's answer position (the text cut to ``max_tokens`` tokens,
    rendered by the template up to its empty label slot: where the label word would be predicted). Not in the
    store: computed with the model (:func:`answer_states`), as the prompted baselines (zero-shot, in-context
    learning) and kNN prompting (Xu et al. 2023) read it.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import torch

from latent_atlas.addresses import LN_FINAL
from latent_atlas.corpus import SPLITS
from latent_atlas.errors import ConfigError, StoreError
from latent_atlas.hooks import capture_residuals
from latent_atlas.models import LoadedModel
from latent_atlas.readers.baselines import query_token_ids
from latent_atlas.readers.clustering import LabelledSplit
from latent_atlas.store import ActivationStore

Pooling = Literal["last", "mean"]
TRAIN, HELDOUT = SPLITS
INPUTS = ("raw", "template")


@dataclass(frozen=True)
class DocumentVectors:
    """One vector per stored document, with the document's id, label and split (store order)."""

    doc_ids: tuple[str, ...]
    labels: tuple[str, ...]
    splits: tuple[str, ...]
    vectors: torch.Tensor

    def indices(self, split: str) -> list[int]:
        """Positions (store order) of one split's documents."""
        return [i for i, s in enumerate(self.splits) if s == split]

    def select(self, split: str) -> "DocumentVectors":
        """The documents of one split."""
        keep = self.indices(split)
        return DocumentVectors(
            tuple(self.doc_ids[i] for i in keep),
            tuple(self.labels[i] for i in keep),
            tuple(self.splits[i] for i in keep),
            self.vectors[keep],
        )


def document_vectors(store: ActivationStore, address: str, max_tokens: int, pooling: Pooling) -> DocumentVectors:
    """Each document's state at ``address``: the last of its first ``max_tokens`` tokens, or their mean.

    Raises:
        StoreError: the store keeps only a fraction of the tokens (positions would not be a prefix), or it has
            no labels.
    """
    extraction = store.attrs.get("extraction", {})
    settings = json.loads(extraction) if isinstance(extraction, str) else extraction
    fraction = float(settings.get("token_fraction", 1.0))
    if fraction < 1.0:
        raise StoreError(
            f"{store.path} keeps {fraction:.0%} of each document's tokens; the readers need every position: "
            "set extraction.token_fraction: 1.0 for this corpus's store"
        )
    docs = store.docs()
    if "label" not in docs.columns or "split" not in docs.columns:
        raise StoreError(
            f"{store.path} has no labels or splits: a reader task needs a corpus with label_field and splits"
        )
    starts = docs["token_start"].to_numpy()
    counts = np.minimum(docs["token_count"].to_numpy(), max_tokens)
    if pooling == "last":
        vectors = torch.from_numpy(store.read(address, starts + counts - 1))
    else:
        vectors = _prefix_means(store, address, starts, counts)
    return DocumentVectors(
        tuple(docs["doc_id"].to_list()), tuple(docs["label"].to_list()), tuple(docs["split"].to_list()), vectors
    )


def _prefix_means(store: ActivationStore, address: str, starts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """The mean state over each document's first ``count`` rows (one contiguous read per document)."""
    means = [
        store.read(address, slice(int(start), int(start + count))).mean(axis=0)
        for start, count in zip(starts, counts, strict=True)
    ]
    return torch.from_numpy(np.stack(means)) if means else torch.empty(0, store.d_model)


def check_label_words(labels: Sequence[str], label_words: Mapping[str, str], task: str) -> None:
    """Every label of a task's corpus needs a label word; raise :class:`ConfigError` naming the key otherwise."""
    unknown = sorted(set(labels) - set(label_words))
    if unknown:
        raise ConfigError(
            f"readers.tasks.{task}.label_words has no word for the label(s) {unknown} of its corpus: add one for each"
        )


def labelled_split(vectors: DocumentVectors, label_words: Mapping[str, str], task: str) -> LabelledSplit:
    """The task's train and held-out splits, classes in the order of ``label_words``.

    Raises:
        ConfigError: a label of the corpus has no label word, or a split is empty.
    """
    check_label_words(vectors.labels, label_words, task)
    classes = list(label_words)
    parts = {split: vectors.select(split) for split in (TRAIN, HELDOUT)}
    for split, part in parts.items():
        if not part.doc_ids:
            raise ConfigError(
                f"readers.tasks.{task}: its corpus has no {split!r} documents "
                "(the split field must say train or heldout)"
            )
    train, test = parts[TRAIN], parts[HELDOUT]
    return LabelledSplit(
        labels=tuple(classes),
        train_x=train.vectors.float(),
        train_y=torch.tensor([classes.index(label) for label in train.labels]),
        test_x=test.vectors.float(),
        test_y=torch.tensor([classes.index(label) for label in test.labels]),
        train_ids=train.doc_ids,
        test_ids=test.doc_ids,
    )


def texts_by_id(corpus: pl.DataFrame, doc_ids: Sequence[str]) -> list[str]:
    """The texts of some documents of a prepared corpus, in the given order."""
    lookup = dict(zip(corpus["doc_id"].to_list(), corpus["text"].to_list(), strict=True))
    missing = [doc for doc in doc_ids if doc not in lookup]
    if missing:
        raise StoreError(
            f"documents {missing[:3]} of the store are not in the corpus: rebuild the store from this corpus"
        )
    return [lookup[doc] for doc in doc_ids]


@torch.no_grad()
def answer_states(loaded: LoadedModel, queries: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """``ln_final`` (the final norm's output, the LM-head input) at each query's last token, ``(n, d)`` float32.

    Queries are run in batches of similar length (right-padded, with an attention mask, so each row sees only
    its own tokens); the final norm's output is captured by the same hook as the store's ``ln_final``.
    """
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    out = torch.zeros(len(queries), loaded.d_model)
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    captured: dict[str, torch.Tensor] = {}
    with capture_residuals(loaded.parts, [], lambda address, states: captured.__setitem__(address, states)):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            lengths = torch.tensor([len(queries[i]) for i in rows], device=loaded.device)
            if int(lengths.min()) == 0:
                raise ValueError("a query encodes to no tokens; the template must put text before {label}")
            width = int(lengths.max())
            ids = [list(queries[i]) + [pad] * (width - len(queries[i])) for i in rows]
            mask = (torch.arange(width, device=loaded.device)[None] < lengths[:, None]).long()
            loaded.parts.body(input_ids=torch.tensor(ids, device=loaded.device), attention_mask=mask, use_cache=False)
            states = captured.pop(LN_FINAL)
            out[rows] = states[torch.arange(len(rows), device=loaded.device), lengths - 1].float().cpu()
    return out


def templated_split(
    loaded: LoadedModel,
    corpus: pl.DataFrame,
    raw: LabelledSplit,
    template: str,
    max_tokens: int,
    batch_size: int = 16,
) -> LabelledSplit:
    """The same split as ``raw`` (documents, classes, order) read at the template's answer position.

    Each text is cut to its first ``max_tokens`` tokens and rendered by ``template`` up to ``{label}`` as
    zero-shot prompting renders it (:func:`~latent_atlas.readers.baselines.query_token_ids`).
    """
    states = {
        name: answer_states(
            loaded, query_token_ids(loaded.tokenizer, texts_by_id(corpus, ids), template, max_tokens), batch_size
        )
        for name, ids in (("train", raw.train_ids), ("test", raw.test_ids))
    }
    return LabelledSplit(
        labels=raw.labels,
        train_x=states["train"],
        train_y=raw.train_y,
        test_x=states["test"],
        test_y=raw.test_y,
        train_ids=raw.train_ids,
        test_ids=raw.test_ids,
    )
