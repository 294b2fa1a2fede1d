"""Semantic clustering on vocabulary-defined semantic bases (Gu et al.; METHODS §4).

Inputs are representations r ∈ R^d already computed elsewhere: the LM-head input (post-final-norm state,
the store's ``ln_final``) of the last token of each text. The semantic bases s_i are the rows of W^+ with
W = W_U^T (d x V), computed by :func:`latent_atlas.linalg.pinv_svd` in float64 and kept as unit vectors; r is
read by its cosines ℓ_i(r) = cos(r, s_i). Because r is already post-final-norm, the final norm is *not* applied
again here (:class:`~latent_atlas.lenses.SemanticBasisLens` takes a pre-norm residual and applies N_f itself).

A class is represented by the first token of its label word (e.g. `` story``). The clustering module λ is
trained so that λ(r) of a labelled text lies closest to its label's basis; a text is classified by the
argmax over the class label words' bases of cos(λ(r), s_label). With λ the identity this is the untrained
"semantic bases zero-shot" reading.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn import functional

from latent_atlas.errors import ConfigError
from latent_atlas.linalg import pinv_svd
from latent_atlas.provenance import config_hash

Variant = Literal["all_bases", "gt_only"]
VARIANTS: tuple[str, ...] = ("all_bases", "gt_only")


# --------------------------------------------------------------------------------------------------
# Labelled data


@dataclass(frozen=True, eq=False)
class LabelledSplit:
    """Representations of labelled texts, split into train and test (every method reads the same object).

    Arrays are converted on construction: ``x`` to float32 tensors, ``y`` to long tensors.

    Attributes:
        labels: class names; class ``c`` is ``labels[c]``.
        train_x: training representations, shape ``(n_train, d)``.
        train_y: their classes in ``0..n_classes-1``, shape ``(n_train,)``.
        test_x: test representations, shape ``(n_test, d)``.
        test_y: their classes, shape ``(n_test,)``.
        train_ids: document ids of the training rows (unique, disjoint from ``test_ids``).
        test_ids: document ids of the test rows.
    """

    labels: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            x = torch.as_tensor(getattr(self, f"{name}_x")).detach().to(torch.float32)
            y = torch.as_tensor(getattr(self, f"{name}_y")).detach()
            object.__setattr__(self, f"{name}_x", x)
            object.__setattr__(self, f"{name}_y", y.to(torch.long))
            object.__setattr__(self, f"{name}_ids", tuple(str(i) for i in getattr(self, f"{name}_ids")))
            _check_rows(name, x, y, getattr(self, f"{name}_ids"), len(self.labels))
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be at least two distinct class names, got {self.labels}")
        if self.train_x.shape[1] != self.test_x.shape[1]:
            raise ValueError(f"train_x has width {self.train_x.shape[1]} but test_x has {self.test_x.shape[1]}")
        shared = set(self.train_ids) & set(self.test_ids)
        if shared:
            raise ValueError(f"{len(shared)} documents are in both train and test, e.g. {sorted(shared)[:3]}")

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.labels)

    @property
    def d_model(self) -> int:
        """Width d of the representations."""
        return int(self.train_x.shape[1])

    @property
    def split_hash(self) -> str:
        """sha256[:16] of the sorted train ids and the sorted test ids: which split a result used."""
        return config_hash({"train": sorted(self.train_ids), "test": sorted(self.test_ids)})


def _check_rows(name: str, x: torch.Tensor, y: torch.Tensor, ids: tuple[str, ...], n_classes: int) -> None:
    """Validate one side of a split: shapes, label range, unique ids."""
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or len(ids) != y.shape[0]:
        raise ValueError(
            f"{name}_x must be (n, d), {name}_y (n,) and {name}_ids n long; got {tuple(x.shape)}, "
            f"{tuple(y.shape)} and {len(ids)} ids"
        )
    if x.shape[0] == 0:
        raise ValueError(f"the {name} split is empty")
    if y.dtype.is_floating_point or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{name}_y must hold class indices in 0..{n_classes - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}_ids has duplicates")


# --------------------------------------------------------------------------------------------------
# Label words and semantic bases


def label_token_ids(tokenizer: Any, label_words: Mapping[str, str], task: str) -> list[int]:
    """The first token id of each class's label word, in the mapping's (class) order.

    Args:
        tokenizer: an HF tokenizer; words are encoded without special tokens.
        label_words: class name -> label word, usually with a leading space (`` story``), since the word
            follows the text.
        task: the task's name in config, for the error message.

    Raises:
        ConfigError: (a ValueError) naming ``readers.tasks.<task>.label_words`` if a word encodes to nothing
            or to the unknown token, or two classes share a first token.
    """
    key = f"readers.tasks.{task}.label_words"
    unknown = getattr(tokenizer, "unk_token_id", None)
    seen: dict[int, str] = {}
    for label, word in label_words.items():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"{key}.{label} = {word!r} encodes to no token; choose a non-empty word")
        if unknown is not None and ids[0] == unknown:
            raise ConfigError(
                f"{key}.{label} = {word!r} starts with the unknown token; choose a word in the vocabulary"
            )
        if ids[0] in seen:
            raise ConfigError(
                f"{key}: {seen[ids[0]]!r} and {label!r} share their first token {tokenizer.decode(ids[:1])!r} "
                f"(id {ids[0]}); classes are read by first tokens, so choose words that differ in their first token"
            )
        seen[ids[0]] = label
    return list(seen)


@dataclass(frozen=True)
class SemanticBases:
    """Unit semantic bases of a vocabulary and the conditioning of the head they came from.

    Attributes:
        unit: s_i / ‖s_i‖ in float32, shape ``(V, d)``; a token with a zero unembedding row has a zero row.
        rank: rank of W kept by the SVD cutoff.
        condition_number: κ(W) = σ_max / σ_min over the kept singular values.
    """

    unit: torch.Tensor
    rank: int
    condition_number: float

    def __getitem__(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``bases[token_ids]`` is :meth:`rows`: the unit bases of those tokens."""
        return self.rows(token_ids)

    def rows(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The unit bases of ``token_ids`` (e.g. the label words' first tokens), shape ``(len(token_ids), d)``."""
        return self.unit[torch.as_tensor(token_ids, dtype=torch.long)]


def semantic_bases(unembed_weight: torch.Tensor, rcond: float = 1e-6) -> SemanticBases:
    """All V unit semantic bases: the rows of W^+ for W = W_U^T, by float64 SVD, normalised.

    Args:
        unembed_weight: W_U (``lm_head.weight``), shape ``(V, d)``.
        rcond: relative singular-value cutoff of the pseudo-inverse.
    """
    pinv = pinv_svd(unembed_weight.T, rcond)
    bases = pinv.pseudo_inverse
    norms = bases.norm(dim=-1, keepdim=True)
    # Same convention as SemanticBasisLens: a token without a direction gets cosine 0 with everything.
    live = norms > 1e-8 * norms.max()
    unit = torch.where(live, bases / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return SemanticBases(unit.to(torch.float32), pinv.rank, pinv.condition_number)


def label_bases(unembed_weight: torch.Tensor, token_ids: Sequence[int], rcond: float = 1e-6) -> torch.Tensor:
    """Unit semantic bases of the label words' first tokens, shape ``(n_classes, d)`` (W^+ needs all of W)."""
    return semantic_bases(unembed_weight, rcond).rows(token_ids)


# --------------------------------------------------------------------------------------------------
# The clustering module


class SemanticClusteringModule(nn.Module):
    """λ(r) = LN(MLP(r ⊙ CA(r))), with CBAM-style channel attention CA(r) = σ(Bn(avgpool r) + Bn(maxpool r)).

    Our reading of the paper's equation (METHODS §4): the d channels of the representation are gated by a
    channel attention as in CBAM (Woo et al. 2018): pool over positions by mean and by max, pass both through
    one shared bottleneck Bn = Linear(d, d/reduction) -> ReLU -> Linear(d/reduction, d), add, sigmoid. METHODS
    writes CA without the sigmoid; CBAM's channel attention, whose avg/max-pool + shared-bottleneck form this
    is, has it, and it keeps the gate in (0, 1). With a single position (input ``(n, d)``) both poolings are
    the identity, so CA(r) = σ(2 Bn(r)). The gated vector goes through MLP = Linear(d, 2d) -> GELU ->
    Linear(2d, d) and a LayerNorm(d). With h = d // reduction the module has 4d² + 2dh + 6d + h parameters
    (≈ 33/8·d² for reduction 16).
    """

    def __init__(self, d_model: int, reduction: int = 16) -> None:
        super().__init__()
        if d_model < 1 or reduction < 1:
            raise ValueError(f"d_model and reduction must be positive, got {d_model} and {reduction}")
        hidden = max(1, d_model // reduction)
        self.bottleneck = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model))
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.norm = nn.LayerNorm(d_model)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Channel gates ``(n, d)`` in (0, 1) of states ``(n, t, d)``, pooled over the t positions."""
        return torch.sigmoid(self.bottleneck(x.mean(dim=-2)) + self.bottleneck(x.amax(dim=-2)))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """Map ``(n, d)`` or ``(n, t, d)`` representations to calibrated ones of the same shape."""
        if r.ndim not in (2, 3):
            raise ValueError(f"expected (n, d) or (n, t, d) representations, got shape {tuple(r.shape)}")
        x = r if r.ndim == 3 else r[:, None]
        out = self.norm(self.mlp(x * self.channel_attention(x)[:, None]))
        return out if r.ndim == 3 else out[:, 0]


# --------------------------------------------------------------------------------------------------
# Reading and predicting


def cosine_scores(module: nn.Module | None, x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """cos(λ(x), s) for every basis row, shape ``(n, n_bases)``; ``module=None`` reads x itself (λ = identity).

    ``x`` is ``(n, d)`` post-final-norm representations; ``bases`` ``(n_bases, d)`` unit bases (all V, or the
    label words' only). No final norm is applied: x is already the LM-head input.
    """
    with torch.no_grad():
        calibrated = x if module is None else _evaluate(module, x)
        return functional.normalize(calibrated.to(bases.dtype), dim=-1) @ bases.T


def predict_with_bases(module: nn.Module | None, x: torch.Tensor, label_bases: torch.Tensor) -> torch.Tensor:
    """Class index ``(n,)``: the argmax over the label words' unit bases ``(n_classes, d)`` of cos(λ(x), s)."""
    return cosine_scores(module, x, label_bases).argmax(dim=-1)


def _evaluate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` in eval mode, restoring its previous mode."""
    was_training = module.training
    module.eval()
    try:
        return module(x)
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------------------------
# Training


def train_clustering(
    split: LabelledSplit,
    bases: SemanticBases | torch.Tensor,
    variant: Variant,
    label_token_ids: Sequence[int] | None,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 32,
    temperature: float = 0.05,
    weight_decay: float = 0.01,
    seed: int = 0,
    reduction: int = 16,
) -> tuple[SemanticClusteringModule, pl.DataFrame]:
    """Train a clustering module on ``split``'s training rows (CPU, float32, deterministic given ``seed``).

    Variants:
        ``all_bases``: cross-entropy of softmax(cos(λ(r), s_i) / temperature) over all V bases, the target
            being the label word's first token. V-way: every example costs a ``(d, V)`` product forward and
            backward (V x d per example), and the loss also pushes λ(r) away from every other token.
        ``gt_only``: loss = 1 − cos(λ(r), s_y), pulling λ(r) toward its true label's basis only: one basis per
            example, 1/V of the cost. ``temperature`` is unused.

    Args:
        split: the labelled representations; only ``train_x``/``train_y`` are used.
        bases: the unit semantic bases ``(V, d)`` (a :class:`SemanticBases` or its ``unit``); for ``gt_only`` with
            ``label_token_ids=None``, the label words' bases ``(n_classes, d)`` in class order.
        variant: ``all_bases`` or ``gt_only``.
        label_token_ids: first token of each class's label word, in class order (rows of ``bases``).
        epochs: passes over the training rows.
        lr: AdamW learning rate.
        batch_size: examples per step.
        temperature: divides the cosine logits of ``all_bases`` (cosines alone give an almost flat softmax).
        weight_decay: AdamW weight decay.
        seed: seeds the module's initialisation and the batch order (the global RNG is left untouched).
        reduction: bottleneck reduction of the channel attention.

    Returns:
        The trained module (eval mode) and its loss log: one row per epoch with ``epoch``, ``loss`` (mean
        training loss over the epoch's examples) and ``variant``.
    """
    targets, target_bases = _training_targets(split, bases, variant, label_token_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = SemanticClusteringModule(split.d_model, reduction)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    x, n = split.train_x, split.train_x.shape[0]
    log = []
    module.train()
    for epoch in range(epochs):
        total = 0.0
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            cosines = functional.normalize(module(x[batch]), dim=-1) @ target_bases.T
            if variant == "all_bases":
                loss = functional.cross_entropy(cosines / temperature, targets[batch])
            else:
                loss = (1.0 - cosines.gather(1, targets[batch, None])).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        log.append({"epoch": epoch, "loss": total / n, "variant": variant})
    module.eval()
    return module, pl.DataFrame(log, schema={"epoch": pl.Int64, "loss": pl.Float64, "variant": pl.String})


def _training_targets(
    split: LabelledSplit, bases: SemanticBases | torch.Tensor, variant: str, label_token_ids: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``(n_train,)`` (rows of the returned bases) and the bases the loss compares with."""
    if isinstance(bases, SemanticBases):
        bases = bases.unit
    if variant not in VARIANTS:
        raise ValueError(f"unknown clustering variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if bases.ndim != 2 or bases.shape[1] != split.d_model:
        raise ValueError(f"bases must be (n_bases, {split.d_model}), got {tuple(bases.shape)}")
    bases = bases.detach().to(torch.float32)
    if label_token_ids is None:
        if variant == "all_bases" or bases.shape[0] != split.n_classes:
            raise ValueError("without label_token_ids, bases must be the label bases (n_classes, d) of gt_only")
        return split.train_y, bases
    ids = torch.as_tensor(list(label_token_ids), dtype=torch.long)
    if ids.shape != (split.n_classes,) or ids.min() < 0 or ids.max() >= bases.shape[0]:
        raise ValueError(f"need {split.n_classes} label token ids, rows of the {bases.shape[0]} bases; got {ids}")
    if variant == "all_bases":
        return ids[split.train_y], bases
    return split.train_y, bases[ids]


# --------------------------------------------------------------------------------------------------
# Scores


def classification_scores(y_true: Any, y_pred: Any, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of class predictions.

    ``balanced_accuracy`` is the mean recall over the classes present in ``y_true``. ``macro_f1`` averages
    F1 = 2TP / (2TP + FP + FN) over the classes present in ``y_true`` or in ``y_pred``: a class never true
    and never predicted has an undefined F1 and is left out (as scikit-learn does without ``labels``); a
    class predicted but never true has F1 0, and so does a true class never predicted.

    Args:
        y_true: true classes ``(n,)`` (tensor, array or list).
        y_pred: predicted classes ``(n,)``.
        n_classes: number of classes; both must lie in ``0..n_classes-1``.
    """
    true, pred = np.asarray(y_true, dtype=np.int64).ravel(), np.asarray(y_pred, dtype=np.int64).ravel()
    if true.shape != pred.shape or true.size == 0:
        raise ValueError(f"y_true and y_pred must be equally long and non-empty, got {true.size} and {pred.size}")
    if min(true.min(), pred.min()) < 0 or max(true.max(), pred.max()) >= n_classes:
        raise ValueError(f"classes must lie in 0..{n_classes - 1}")
    true_count = np.bincount(true, minlength=n_classes)
    pred_count = np.bincount(pred, minlength=n_classes)
    hits = np.bincount(true[true == pred], minlength=n_classes)
    present = true_count > 0
    scored = present | (pred_count > 0)
    f1 = 2 * hits[scored] / (true_count[scored] + pred_count[scored])
    return {
        "accuracy": float((true == pred).mean()),
        "balanced_accuracy": float((hits[present] / true_count[present]).mean()),
        "macro_f1": float(f1.mean()),
    }
