"""The register classifier of the hub corpus: label probabilities for texts, and labelling by a source's map.

:class:`RegisterClassifier` wraps any ``AutoModelForSequenceClassification`` and its tokenizer;
:func:`label_documents` keeps the texts whose most probable mapped label reaches a hub source's threshold.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl
import torch

from latent_atlas.errors import CorpusError, ModelAcquisitionError
from latent_atlas.models import resolve_device

if TYPE_CHECKING:
    from latent_atlas.training.hub import HubSource

ACTIVATIONS = ("auto", "sigmoid", "softmax")


class Classifier(Protocol):
    """What :func:`label_documents` needs of a classifier (:class:`RegisterClassifier`, or a stub in tests)."""

    @property
    def label_names(self) -> Sequence[str]:
        """The label of each column of :meth:`probabilities`."""
        ...

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """Return an ``(n, len(label_names))`` tensor of label probabilities."""
        ...


class RegisterClassifier:
    """A sequence classifier and its tokenizer, returning label probabilities for texts.

    Attributes:
        model: the classifier, in eval mode, on ``device``.
        tokenizer: its tokenizer.
        label_names: the label of each output, from ``model.config.id2label``.
        activation: ``sigmoid`` (multi-label) or ``softmax``.
        identifier: the model id or path it was loaded from (``None`` when built from a loaded model).
        revision: the revision asked for; ``commit`` the one the hub resolved it to, when known.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        max_length: int = 512,
        activation: str = "auto",
        device: str | torch.device = "auto",
        identifier: str | None = None,
        revision: str | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise CorpusError(f"activation is {activation!r}; use one of {', '.join(ACTIVATIONS)}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        config = model.config
        id2label = {int(index): str(label) for index, label in config.id2label.items()}
        if sorted(id2label) != list(range(len(id2label))) or len(id2label) != config.num_labels:
            raise ModelAcquisitionError(f"classifier {identifier or ''} has an inconsistent id2label {id2label}")
        self.label_names: tuple[str, ...] = tuple(id2label[index] for index in range(len(id2label)))
        if activation == "auto":
            multi = getattr(config, "problem_type", None) == "multi_label_classification"
            activation = "sigmoid" if multi else "softmax"
        self.activation = activation
        self.identifier = identifier
        self.revision = revision
        self.commit: str | None = getattr(config, "_commit_hash", None)

    @classmethod
    def from_pretrained(
        cls,
        classifier: str,
        revision: str | None = None,
        **options: Any,
    ) -> "RegisterClassifier":
        """Load ``AutoTokenizer`` and ``AutoModelForSequenceClassification`` from a model id or directory.

        ``options`` are those of the constructor (``batch_size``, ``max_length``, ``activation``, ``device``).

        Raises:
            ModelAcquisitionError: naming ``classifier`` and ``classifier_revision`` when loading fails.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(classifier, revision=revision)
            model = AutoModelForSequenceClassification.from_pretrained(classifier, revision=revision)
        except (OSError, ValueError, KeyError) as error:
            raise ModelAcquisitionError(
                f"could not load the classifier {classifier!r} (revision {revision!r}): {error}; set classifier to "
                "a sequence-classification model id on the hub or a local directory with config.json, check "
                "classifier_revision, and network access"
            ) from error
        return cls(model, tokenizer, identifier=classifier, revision=revision, **options)

    @classmethod
    def from_source(cls, source: "HubSource") -> "RegisterClassifier":
        """Load the classifier a hub source names, and check its ``labels`` against the classifier's labels."""
        device = resolve_device(source.device, "training.corpus.device")
        loaded = cls.from_pretrained(
            source.classifier,
            source.classifier_revision,
            batch_size=source.batch_size,
            max_length=source.max_length,
            activation=source.activation,
            device=device,
        )
        check_label_map(source.labels, loaded.label_names, source.classifier)
        return loaded

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the ``(len(texts), len(label_names))`` float32 label probabilities, on the CPU.

        Texts are read in batches of ``batch_size``, truncated to ``max_length`` tokens.
        """
        batches = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                encoded = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                logits = self.model(**encoded).logits.float()
                probs = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=-1)
                batches.append(probs.cpu())
        if not batches:
            return torch.zeros(0, len(self.label_names))
        return torch.cat(batches)


def check_label_map(labels: Mapping[str, str], label_names: Sequence[str], classifier: str | None = None) -> None:
    """Fail, listing the classifier's labels, when a key of ``labels`` is not one of them."""
    unknown = [label for label in labels if label not in label_names]
    if unknown:
        raise CorpusError(
            f"hub source: labels maps {unknown}, which the classifier {classifier or ''} does not have; "
            f"its labels are {', '.join(label_names)}"
        )


def label_documents(
    texts: Sequence[str], classifier: Classifier, source: "HubSource"
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Label each text with the register of its most probable mapped label; keep those at the threshold.

    A text's label is the mapped classifier label (a key of ``source.labels``) with the highest probability
    (the first in the classifier's order on ties); it is kept when that probability, as a float64, is
    ``>= source.threshold``. Unmapped labels are ignored even when they are more probable.

    Returns:
        The kept texts (columns ``index`` (position in ``texts``), ``text``, ``label``, ``register``,
        ``probability``, in input order) and the counts ``classified``, ``below_threshold`` and ``kept``
        (per register).
    """
    names = list(classifier.label_names)
    check_label_map(source.labels, names, getattr(classifier, "identifier", None))
    columns = [index for index, name in enumerate(names) if name in source.labels]
    probs = classifier.probabilities(texts)
    if tuple(probs.shape) != (len(texts), len(names)):
        raise CorpusError(f"the classifier returned probabilities of shape {tuple(probs.shape)} for {len(texts)} texts")
    mapped = probs.detach().to("cpu", torch.float64)[:, columns]
    best = mapped.argmax(dim=1).tolist() if len(texts) else []
    rows: dict[str, list[Any]] = {"index": [], "text": [], "label": [], "register": [], "probability": []}
    for index, (text, column) in enumerate(zip(texts, best, strict=True)):
        probability = float(mapped[index, column])
        if probability >= source.threshold:
            label = names[columns[column]]
            for key, value in zip(rows, (index, text, label, source.labels[label], probability), strict=True):
                rows[key].append(value)
    table = pl.DataFrame(
        rows,
        schema={
            "index": pl.Int64,
            "text": pl.String,
            "label": pl.String,
            "register": pl.String,
            "probability": pl.Float64,
        },
    )
    kept = Counter(rows["register"])
    counts = {
        "classified": len(texts),
        "below_threshold": len(texts) - table.height,
        "kept": {register: kept[register] for register in sorted(kept)},
    }
    return table, counts
