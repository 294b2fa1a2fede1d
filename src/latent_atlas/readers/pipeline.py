"""The readers' jobs: semantic clustering against its baselines on one task, and the ELM's training and evaluation.

Semantic clustering (METHODS §4) and every baseline read one split of the task's documents, so they are
scored on exactly the same documents; each result row carries the split's hash to show it. Every state
reader (semantic bases, zero-shot, kNN prompting, the linear probe, semantic clustering) reads both inputs of
:mod:`latent_atlas.readers.data`, the raw text's last state and the template's answer-position state (the
``input`` column); in-context learning and the LoRA baseline read the template by definition.
"""

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch

from latent_atlas.addresses import LN_FINAL, resid_address
from latent_atlas.errors import ConfigError
from latent_atlas.models import LoadedModel
from latent_atlas.names import ELM_TASKS
from latent_atlas.provenance import provenance_record
from latent_atlas.readers import baselines, clustering, elm, lora
from latent_atlas.readers.clustering import LabelledSplit
from latent_atlas.readers.data import (
    HELDOUT,
    TRAIN,
    DocumentVectors,
    check_label_words,
    document_vectors,
    labelled_split,
    templated_split,
    texts_by_id,
)
from latent_atlas.readers.settings import CLUSTERING_VARIANTS, ComparisonSettings, ElmSettings, Task
from latent_atlas.store import ActivationStore

log = logging.getLogger(__name__)


# ---- semantic clustering and its baselines ------------------------------------------------------------------


def task_split(store: ActivationStore, task: Task, max_tokens: int) -> LabelledSplit:
    """The task's split of LM-head inputs (``ln_final``) at the last of each text's first ``max_tokens`` tokens."""
    vectors = document_vectors(store, LN_FINAL, max_tokens, "last")
    return labelled_split(vectors, task.label_words, task.name)


def compare_readers(
    loaded: LoadedModel, store: ActivationStore, corpus: pl.DataFrame, settings: ComparisonSettings
) -> pl.DataFrame:
    """Score semantic clustering (each variant, each seed) and every baseline on the task's one split.

    Args:
        loaded: the model.
        store: its store of the task's corpus (the raw input).
        corpus: the corpus's texts (the templated input, and prompts).
        settings: the task, ``readers.clustering``, ``readers.lora`` (no LoRA rows when off) and ``max_tokens``.

    Returns:
        One row per (method, input, seed): ``task``, ``method``, ``input`` (``raw``/``template``), ``seed`` (null
        for methods without randomness), ``balanced_accuracy``, ``macro_f1``, ``accuracy``, ``n_train``,
        ``n_test``, ``n_classes``, ``split_hash``, and per test item (lists in test order) ``doc_id`` and
        ``correct``, which :mod:`latent_atlas.readers.uncertainty` resamples.
    """
    task, options, max_tokens = settings.task, settings.clustering, settings.max_tokens
    raw = task_split(store, task, max_tokens)
    template = templated_split(loaded, corpus, raw, task.template, max_tokens, options.batch_size_icl)
    inputs = {"raw": raw, "template": template}
    token_ids = clustering.label_token_ids(loaded.tokenizer, task.label_words, task.name)
    head = loaded.parts.lm_head.weight.detach().float().cpu()
    bias = getattr(loaded.parts.lm_head, "bias", None)
    head_bias = bias.detach().float().cpu() if bias is not None else None
    head_transform = getattr(loaded.parts.lm_head, "transform", None)  # the model's post-head scale / soft-cap
    bases = clustering.semantic_bases(head)
    label_bases = bases[token_ids]
    log.info(
        "%s: %d training and %d held-out texts, %d classes",
        task.name,
        len(raw.train_ids),
        len(raw.test_ids),
        len(raw.labels),
    )
    rows: list[dict[str, Any]] = []

    def record(method: str, read: str, seed: int | None, predictions: torch.Tensor) -> None:
        scores = clustering.classification_scores(raw.test_y, predictions, len(raw.labels))
        correct = (torch.as_tensor(predictions).cpu().long() == raw.test_y.cpu().long()).tolist()
        items = {"doc_id": list(raw.test_ids), "correct": correct}  # per test item, for the item bootstrap
        rows.append({"method": method, "input": read, "seed": seed, **scores, **items})
        log.info(
            "%-22s %-8s seed %-4s balanced accuracy %.3f  macro F1 %.3f",
            method,
            read,
            seed,
            scores["balanced_accuracy"],
            scores["macro_f1"],
        )

    for read, split in inputs.items():
        record("semantic_bases", read, None, clustering.predict_with_bases(None, split.test_x, label_bases))
        zero_shot = baselines.zero_shot_from_states(split.test_x, head, token_ids, bias=head_bias)
        record("zero_shot", read, None, zero_shot)
        knn = baselines.knn_prompting(split, head, options.knn_k, bias=head_bias, transform=head_transform)
        record("knn_prompting", read, None, knn)
        record("linear_probe", read, None, baselines.linear_probe(split, options.probe_weight_decay))
    prompts = _prompted(loaded, corpus, raw, settings)
    for seed in options.seeds:
        demonstrations = baselines.choose_demonstrations(raw.train_y, options.shots_per_class, seed)
        record("in_context", "template", seed, prompts(demonstrations))
        for read, split in inputs.items():
            for variant in options.variants:
                module, _ = clustering.train_clustering(
                    split,
                    bases,
                    variant,
                    token_ids,
                    epochs=options.epochs,
                    lr=options.lr,
                    batch_size=options.batch_size,
                    temperature=options.temperature,
                    weight_decay=options.weight_decay,
                    reduction=options.reduction,
                    seed=seed,
                )
                predictions = clustering.predict_with_bases(module, split.test_x, label_bases)
                record(CLUSTERING_VARIANTS[variant], read, seed, predictions)
    if settings.lora is not None:
        for seed, predictions in _lora_predictions(loaded, corpus, raw, token_ids, settings, settings.lora):
            record("lora", "template", seed, predictions)
    return pl.DataFrame(rows).with_columns(
        task=pl.lit(task.name),
        n_train=pl.lit(len(raw.train_ids)),
        n_test=pl.lit(len(raw.test_ids)),
        n_classes=pl.lit(len(raw.labels)),
        shots_per_class=pl.lit(options.shots_per_class),
        split_hash=pl.lit(raw.split_hash),
    )


def _lora_predictions(
    loaded: LoadedModel,
    corpus: pl.DataFrame,
    split: LabelledSplit,
    token_ids: Sequence[int],
    settings: ComparisonSettings,
    options: lora.LoraSettings,
) -> list[tuple[int, torch.Tensor]]:
    """The LoRA baseline's predictions of the held-out texts, one per seed of ``settings.lora_seeds``.

    Training texts are clustering's.
    """
    epochs = settings.clustering.epochs
    steps = options.budget_steps(len(split.train_ids), epochs)
    queries = {
        name: baselines.query_token_ids(
            loaded.tokenizer, texts_by_id(corpus, ids), settings.task.template, settings.max_tokens
        )
        for name, ids in (("train", split.train_ids), ("test", split.test_ids))
    }
    log.info(
        "lora: rank %d on %s, %d steps of %d texts (%d examples; clustering sees %d)",
        options.rank, ",".join(options.target_modules), steps, options.batch_size,
        steps * options.batch_size, epochs * len(split.train_ids),
    )  # fmt: skip
    results = []
    for seed in settings.lora_seeds:
        predictions, losses = lora.train_and_predict(
            loaded,
            queries["train"],
            split.train_y,
            queries["test"],
            token_ids,
            options,
            steps,
            seed,
            settings.clustering.batch_size_icl,
        )
        if losses:
            log.info("lora seed %d: training loss %.3f (first step) -> %.3f (last)", seed, losses[0], losses[-1])
        results.append((seed, predictions))
    return results


def _prompted(
    loaded: LoadedModel,
    corpus: pl.DataFrame,
    split: LabelledSplit,
    settings: ComparisonSettings,
) -> Callable[[Sequence[int]], torch.Tensor]:
    """Predict the held-out texts by prompting, given indices of training texts as demonstrations."""
    task, options = settings.task, settings.clustering
    train_texts = texts_by_id(corpus, split.train_ids)
    test_texts = texts_by_id(corpus, split.test_ids)
    words = [task.label_words[label] for label in split.labels]

    def predict(demonstrations: Sequence[int]) -> torch.Tensor:
        shown = [(train_texts[i], int(split.train_y[i])) for i in demonstrations]
        predictions, _ = baselines.icl_predict(
            loaded.model,
            loaded.tokenizer,
            shown,
            test_texts,
            words,
            template=task.template,
            separator=options.separator,
            max_tokens=settings.max_tokens,
            batch_size=options.batch_size_icl,
            task=task.name,
        )
        return predictions

    return predict


# ---- the ELM ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElmData:
    """The ELM's points and examples: every passage's embedding (store order) and each task's examples.

    ``examples[split][task]``: the examples of one split's passages for one of :data:`ELM_TASKS`.
    """

    points: DocumentVectors
    references: tuple[str, ...]
    examples: dict[str, dict[str, list[elm.ElmExample]]]

    def rows(self, split: str) -> list[int]:
        """Embedding rows of one split's passages, in store order."""
        return self.points.indices(split)

    @property
    def train(self) -> list[elm.ElmExample]:
        """Both tasks' training examples."""
        return [example for task in ELM_TASKS for example in self.examples[TRAIN][task]]

    @property
    def heldout(self) -> list[elm.ElmExample]:
        """Both tasks' held-out examples."""
        return [example for task in ELM_TASKS for example in self.examples[HELDOUT][task]]


def elm_points(store: ActivationStore, settings: ElmSettings) -> DocumentVectors:
    """The domain embeddings: each passage's pooled state at ``readers.elm.layer``."""
    layer = settings.layer
    if layer not in store.layers:
        raise ConfigError(
            f"readers.elm.layer {layer} is not stored in {store.path} (stored: {store.layers}); "
            "choose a stored layer or add it to extraction.layers"
        )
    return document_vectors(store, resid_address(layer), settings.max_tokens, settings.pooling)


def elm_data(tokenizer: Any, store: ActivationStore, corpus: pl.DataFrame, settings: ElmSettings) -> ElmData:
    """Points, reconstruction references and the examples of both tasks (reconstruction, register)."""
    words = settings.task.label_words
    points = elm_points(store, settings)
    check_label_words(points.labels, words, settings.task.name)
    texts = texts_by_id(corpus, points.doc_ids)
    references = tuple(elm.leading_tokens(tokenizer, texts, settings.target_tokens))
    prompts = settings.prompts
    targets = {"reconstruction": references, "register": [words[label] for label in points.labels]}

    def examples(split: str) -> dict[str, list[elm.ElmExample]]:
        rows = points.indices(split)
        return {task: elm.make_examples(rows, [targets[task][i] for i in rows], prompts[task]) for task in ELM_TASKS}

    data = ElmData(points, references, {split: examples(split) for split in (TRAIN, HELDOUT)})
    if not data.train or len(data.rows(HELDOUT)) < 2:
        raise ConfigError(
            f"readers.elm.task {settings.task.name!r}: its corpus needs training passages "
            "and at least two held-out ones"
        )
    return data


def train_elm(loaded: LoadedModel, data: ElmData, settings: ElmSettings) -> tuple[elm.EmbeddingAdapter, pl.DataFrame]:
    """Train the adapter on both tasks' training examples; held-out loss along the way."""
    vectors = data.points.vectors
    adapter = elm.EmbeddingAdapter.for_model(
        loaded, vectors.shape[1], settings.soft_tokens, settings.hidden_size, settings.seed
    ).standardise_inputs(vectors[data.rows(TRAIN)])
    norms = elm.embedding_norms(loaded.parts)
    log.info(
        "adapter: %d training and %d held-out examples; soft tokens of norm %.3f (token embeddings %.3f..%.3f)",
        len(data.train), len(data.heldout), adapter.target_norm, norms.minimum, norms.maximum,
    )  # fmt: skip
    losses = elm.train_adapter(
        loaded,
        adapter,
        vectors,
        data.train,
        data.heldout,
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        eval_every=settings.eval_every,
        stage=settings.stage,
        lm_lr=settings.lm_lr,
    )
    return adapter, losses


def named_label(text: str, label_words: Mapping[str, str]) -> str | None:
    """The label whose word a generated text starts with (case-insensitive; the longest word wins)."""
    said = text.strip().lower()
    ranked = sorted(label_words.items(), key=lambda item: -len(item[1].strip()))
    return next((label for label, word in ranked if said.startswith(word.strip().lower())), None)


def evaluate_elm(
    loaded: LoadedModel,
    adapter: elm.EmbeddingAdapter,
    data: ElmData,
    settings: ElmSettings,
    judge: LoadedModel | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Held-out controls and descriptions along paths.

    Returns:
        ``scores``: one row per (held-out passage, condition ``true``/``shuffled``/``none``): the target loss of
        reconstruction and of the register word, the generated opening and register, whether the register
        named is the passage's, and semantic consistency in the judge's space (null without a judge).
        ``paths``: descriptions along the interpolation and the direction of ``readers.elm.path``.
    """
    words = settings.task.label_words
    prompts, seed, new = settings.prompts, settings.seed, settings.max_new_tokens
    heldout = data.rows(HELDOUT)
    vectors = data.points.vectors
    shuffled = elm.shuffled_rows(heldout, seed)
    columns: dict[str, list[Any]] = {}
    for condition, rows in (("true", heldout), ("shuffled", shuffled), ("none", None)):
        losses = {
            task: elm.target_losses(loaded, adapter, vectors, data.examples[HELDOUT][task], condition, seed)
            for task in ELM_TASKS
        }
        points = vectors[rows] if rows is not None else None
        opening = _generate(loaded, adapter, points, prompts["reconstruction"], new, len(heldout))
        register = _generate(loaded, adapter, points, prompts["register"], 4, len(heldout))
        named = [named_label(text, words) for text in register]
        block = {
            "doc_id": [data.points.doc_ids[i] for i in heldout],
            "label": [data.points.labels[i] for i in heldout],
            "condition": [condition] * len(heldout),
            "embedding_of": [data.points.doc_ids[i] for i in rows] if rows is not None else [None] * len(heldout),
            "reconstruction_nll": losses["reconstruction"].tolist(),
            "register_nll": losses["register"].tolist(),
            "reference": [data.references[i].strip() for i in heldout],
            "reconstruction_generated": opening,
            "register_generated": register,
            "register_predicted": named,
            "register_correct": [n == data.points.labels[i] for n, i in zip(named, heldout, strict=True)],
        }
        for key, values in block.items():
            columns.setdefault(key, []).extend(values)
    scores = pl.DataFrame(columns)
    scores = scores.with_columns(consistency=_consistency(judge, settings.judge_layer, scores))
    return scores, elm_paths(loaded, adapter, data, settings)


def _generate(
    loaded: LoadedModel, adapter: elm.EmbeddingAdapter, points: torch.Tensor | None, prompt: str, new: int, n: int
) -> list[str]:
    """Greedy generations for some points, or the one no-embedding generation repeated ``n`` times.

    With no points, :func:`elm.generate` drops the placeholder from the prompt's pieces, so the prompt's tokens
    are those the ``none`` condition's losses score.
    """
    if points is None:
        return elm.generate(loaded, None, None, prompt, new) * n
    return elm.generate(loaded, adapter, points, prompt, new)


def _consistency(judge: LoadedModel | None, judge_layer: int | None, scores: pl.DataFrame) -> pl.Series:
    """Cosine in the judge's space between each generated opening and the true one (null without a judge).

    Both are centred on the mean of the true openings' vectors first: mean-pooled states of a language model
    are anisotropic (any two texts have a cosine near 1, METHODS §8.1), so raw cosines would not separate
    the conditions.
    """
    if judge is None:
        return pl.Series("consistency", [None] * scores.height, dtype=pl.Float64)
    layer = judge_layer if judge_layer is not None else judge.n_layers // 2
    generated = elm.mean_pooled_states(judge, scores["reconstruction_generated"].to_list(), layer)
    references = elm.mean_pooled_states(judge, scores["reference"].to_list(), layer)
    centre = references.nanmean(0)
    cosines = elm.semantic_consistency(generated - centre, references - centre)
    return pl.Series("consistency", cosines.tolist(), dtype=pl.Float64)


def elm_paths(loaded: LoadedModel, adapter: elm.EmbeddingAdapter, data: ElmData, settings: ElmSettings) -> pl.DataFrame:
    """Descriptions along the straight line between two held-out passages and along a centroid direction."""
    words, path = settings.task.label_words, settings.path
    vectors, points = data.points.vectors, data.points
    ends = {"from": path.from_label, "to": path.to_label}
    start, end = (_first_heldout(data, ends[key], settings.task.name) for key in ("from", "to"))
    train = data.rows(TRAIN)
    centroid = {key: vectors[[i for i in train if points.labels[i] == label]].mean(0) for key, label in ends.items()}
    direction = centroid["to"] - centroid["from"]
    ts = torch.linspace(0.0, 1.0, path.steps, dtype=torch.float64).tolist()
    line = [(1 - t) * vectors[start] + t * vectors[end] for t in ts]
    moved = [vectors[start] + scale * direction for scale in path.scales]
    along = torch.stack([*line, *moved])
    opening = elm.generate(loaded, adapter, along, settings.prompts["reconstruction"], settings.max_new_tokens)
    register = elm.generate(loaded, adapter, along, settings.prompts["register"], 4)
    kinds = ["interpolation"] * len(line) + ["direction"] * len(moved)
    towards = [points.doc_ids[end]] * len(line) + [f"centroid {ends['to']} − centroid {ends['from']}"] * len(moved)
    return pl.DataFrame(
        {
            "kind": kinds,
            "position": [*ts, *map(float, path.scales)],
            "from_doc": [points.doc_ids[start]] * len(kinds),
            "to_doc": towards,
            "reconstruction_generated": opening,
            "register_generated": register,
            "register_predicted": [named_label(text, words) for text in register],
        }
    )


def _first_heldout(data: ElmData, label: str, task: str) -> int:
    """The row of the first held-out passage (by document id) with ``label``."""
    rows = sorted((data.points.doc_ids[i], i) for i in data.rows(HELDOUT) if data.points.labels[i] == label)
    if not rows:
        raise ConfigError(f"readers.elm.path: task {task!r} has no held-out passage of label {label!r}")
    return rows[0][1]


def summarise_controls(scores: pl.DataFrame) -> pl.DataFrame:
    """Per condition: mean reconstruction and register loss, register accuracy and consistency.

    ``true_beats_shuffled``: the fraction of passages whose own embedding gives a lower reconstruction loss
    than the shuffled one, and ``sign_test_p`` its two-sided exact sign-test p-value (ties left out).
    """
    summary = scores.group_by("condition", maintain_order=True).agg(
        pl.col("reconstruction_nll").mean(),
        pl.col("register_nll").mean(),
        pl.col("register_correct").mean().alias("register_accuracy"),
        pl.col("consistency").mean(),
    )
    true = scores.filter(pl.col("condition") == "true")["reconstruction_nll"].to_numpy()
    shuffled = scores.filter(pl.col("condition") == "shuffled")["reconstruction_nll"].to_numpy()
    wins = float((true < shuffled).mean()) if len(true) else float("nan")
    p_value = sign_test(int((true < shuffled).sum()), int((true > shuffled).sum()))
    return summary.with_columns(true_beats_shuffled=pl.lit(wins), sign_test_p=pl.lit(p_value))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between two equal outcomes."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def reader_provenance(
    loaded: LoadedModel, model: str, settings: Any, store: ActivationStore, **extra: Any
) -> dict[str, Any]:
    """The provenance of a reader's output: its settings, the model's hash, and the store it read."""
    attrs = store.attrs
    return provenance_record(
        {"readers": settings},
        model=model,
        model_sha256=loaded.manifest["weights_sha256"],
        device=str(loaded.device),
        store=str(store.path),
        store_config_hash=attrs.get("config_hash"),
        corpus_sha256=attrs.get("corpus_sha256"),
        **extra,
    )
