"""What the steering rules call: one sweep per method, evaluated into long tables.

Every generation method (ActAdd, mean difference, in-context vectors) is swept over layers x strengths, the
prompts of one length continued under all samples and strengths of a layer in one batch (no padding; a row's
tokens are those of its setting run alone, bar a rare sampled draw flipped by batch-dependent float rounding),
greedy and sampled. Each row of the table is one continuation with its sentiment (VADER compound, from -1 to 1),
its perplexity under the unsteered model, and its setting's off-target damage (KL from the unsteered next-token
distribution on neutral text) and intervention norm relative to the typical norm of the layers it edits.

Precision: the sweeps and ITI may run in bfloat16 (``steering.model_dtype: auto`` on a CUDA device). That is
safe because every comparison a table makes is within one run, hence one dtype: strength 0 is the unsteered
model of that dtype bit for bit (an intervention returns its rows untouched), perplexity and KL are taken
against the unsteered model of the same dtype, sampling seeds are shared by every strength, and log-softmax,
probes and vectors are computed in float32 or float64 from the model's outputs. Relative norms divide by
typical norms read from the store, which may have been extracted in another dtype: a bias of the order of
bfloat16's rounding (~0.4%). Optimised vectors (:func:`run_optimised`) stay in float32: Adam on a vector
through the whole model, stopped when the teacher-forced argmax equals the target, needs float32 gradients
and logits.
"""

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from latent_atlas.models import LoadedModel
from latent_atlas.neighbourhood.knn import typical_norm
from latent_atlas.provenance import provenance_record, sha256_file
from latent_atlas.steering.data import Statements, SteeringData
from latent_atlas.steering.generate import (
    Decoding,
    PerRow,
    StateCapture,
    continuation_log_probs,
    cut_at_eos,
    generate,
    off_target_kl,
    perplexity,
)
from latent_atlas.steering.interventions import HeadDirection, HeadShift, Intervention, MlpShift, ResidualAddition
from latent_atlas.steering.summary import iti_probe_intervals
from latent_atlas.steering.vectors import (
    HeadProbes,
    actadd_vector,
    encode_after,
    fit_head_probes,
    head_activations,
    icv_vectors,
    iti_heads,
    mean_difference_vector,
    optimise_vector,
    prefix_tokens,
    sentence_bleu,
    start_token,
    top_heads,
)
from latent_atlas.store import ActivationStore


@dataclass(frozen=True)
class SweepSettings:
    """How continuations are generated and how many."""

    max_new_tokens: int = 20
    decodings: tuple[Decoding, ...] = (Decoding("greedy"), Decoding("sampled"))
    samples: int = 1
    seed: int = 0
    batch_size: int = 64  # rows (prompts of one length x samples x strengths) per generation batch

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "SweepSettings":
        """Build from the ``steering`` config section."""
        decodings = tuple(
            Decoding(name, section.get("temperature", 1.0), section.get("top_p", 0.9))
            for name in section.get("decodings", ["greedy", "sampled"])
        )
        batch_size = section.get("batch_size", 64)
        return cls(
            section.get("max_new_tokens", 20), decodings, section.get("samples", 1), section.get("seed", 0), batch_size
        )


def steering_provenance(
    loaded: LoadedModel, model: str, settings: Mapping[str, Any], method: str, data: str, store: str, **extra: Any
) -> dict[str, Any]:
    """The provenance of a steering table: its settings and method, the model's hash, the data's hash, the store.

    ``model_dtype`` and ``device`` are what the run computed in and on (``steering.model_dtype: auto`` resolved).
    """
    return provenance_record(
        {"steering": settings, "method": method},
        model=model,
        model_sha256=loaded.manifest["weights_sha256"],
        model_dtype=loaded.dtype,
        device=str(loaded.device),
        data_sha256=sha256_file(data),
        store=store,
        **extra,
    )


def typical_norms(store: ActivationStore, layers: Sequence[int]) -> dict[int, float]:
    """Median ‖h‖ of stored states at each layer (position 0 left out), as in the neighbourhood radii.

    A layer the store lacks takes the norm of the nearest stored layer (the lower one on a tie).
    """
    stored = store.layers
    nearest = {layer: min(stored, key=lambda s: (abs(s - layer), s)) for layer in set(layers)}
    norms = {source: typical_norm(store, source) for source in set(nearest.values())}
    return {layer: norms[nearest[layer]] for layer in sorted(nearest)}


def _row_seed(seed: int, prompt: int, sample: int) -> int:
    """A sampling seed per (prompt, sample), the same for every strength (common random numbers)."""
    return zlib.crc32(f"{seed}/{prompt}/{sample}".encode())


@dataclass
class _Sentiment:
    analyser: Any = field(default=None)

    def __call__(self, text: str) -> float:
        if self.analyser is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self.analyser = SentimentIntensityAnalyzer()
        return float(self.analyser.polarity_scores(text)["compound"])


def relative_norm(changes: Mapping[int, torch.Tensor], norms: Mapping[int, float]) -> np.ndarray:
    """Per row, the mean over edited layers of ‖change‖ / typical norm of that layer."""
    ratios = [changes[layer].double() / norms[layer] for layer in changes]
    return torch.stack(ratios).mean(0).numpy()


SweepRow = tuple[int, int, int]  # (prompt, sample, strength): indexes into a sweep's prompts and coefficients


def sweep_batches(lengths: Sequence[int], samples: int, strengths: int, batch_size: int) -> list[list[SweepRow]]:
    """A sweep's rows in batches: prompts of one length together (no padding), at most ``batch_size`` rows each.

    Lengths are taken in order of first appearance; within one, rows run prompt by prompt, sample, strength.
    """
    groups: dict[int, list[int]] = {}
    for prompt, length in enumerate(lengths):
        groups.setdefault(length, []).append(prompt)
    batches = []
    for group in groups.values():
        rows = [(prompt, sample, c) for prompt in group for sample in range(samples) for c in range(strengths)]
        batches += [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    return batches


def generate_rows(
    loaded: LoadedModel,
    intervention: Intervention,
    coefficients: Sequence[float],
    prompt_ids: Sequence[Sequence[int]],
    rows: Sequence[SweepRow],
    decoding: Decoding,
    settings: "SweepSettings",
    capture: StateCapture | None = None,
) -> torch.Tensor:
    """Continue one batch of :func:`sweep_batches` rows (prompts of one length), each with its own seed and strength.

    A row's seed is that of its (prompt, sample), whatever batch it is in, so its tokens are those of the same
    setting run alone, unless float rounding that depends on the batch's size flips a near-tie (docs/benchmarks.md).
    ``capture`` labels each row's states with its prompt, decoding and sample.
    """
    prompts = [prompt_ids[prompt] for prompt, _, _ in rows]
    seeds = [_row_seed(settings.seed, prompt, sample) for prompt, sample, _ in rows]
    if capture is not None:
        labels = {"prompt_id": PerRow(tuple(p for p, _, _ in rows)), "decoding": decoding.name}
        capture.context.update(**labels, sample=PerRow(tuple(s for _, s, _ in rows)))
    batch = intervention.with_coefficients([coefficients[c] for _, _, c in rows])
    return generate(loaded, prompts, batch, len(rows), settings.max_new_tokens, decoding, seeds, capture)


def _sweep_results(
    loaded: LoadedModel,
    intervention: Intervention,
    coefficients: Sequence[float],
    prompt_ids: Sequence[Sequence[int]],
    settings: SweepSettings,
    capture: StateCapture | None,
) -> dict[tuple[str, int, int, int], tuple[list[int], torch.Tensor]]:
    """Per (decoding, prompt, sample, strength): the continuation cut at EOS and its tokens' log-probabilities."""
    done = {}
    for decoding in settings.decodings:
        samples = settings.samples if decoding.sampled else 1
        for rows in sweep_batches([len(ids) for ids in prompt_ids], samples, len(coefficients), settings.batch_size):
            tokens = generate_rows(loaded, intervention, coefficients, prompt_ids, rows, decoding, settings, capture)
            continuations = cut_at_eos(tokens, loaded.tokenizer.eos_token_id)
            scores = continuation_log_probs(loaded, [prompt_ids[p] for p, _, _ in rows], continuations)
            for row, continuation, score in zip(rows, continuations, scores, strict=True):
                done[(decoding.name, *row)] = continuation, score
    return done


def continuations_table(
    loaded: LoadedModel,
    intervention: Intervention,
    coefficients: Sequence[float],
    prompts: Sequence[str],
    settings: SweepSettings,
    sentiment: Callable[[str], float] | None = None,
    prefix: Sequence[int] | None = None,
    capture: StateCapture | None = None,
) -> pl.DataFrame:
    """Continue every prompt under every strength, prompts of one length x samples x strengths per batch.

    ``prefix``: token ids put before every prompt in place of the tokenizer's own special tokens (ActAdd's
    start token); ``None`` tokenises prompts with the tokenizer's defaults. ``capture`` keeps the generated
    tokens' states, labelled with prompt, decoding and sample. Rows come in the order prompt, decoding, sample,
    strength; each row's tokens are those of its setting run alone (:func:`generate_rows`).
    """
    sentiment = sentiment or _Sentiment()
    tokenizer = loaded.tokenizer
    prompt_ids = [tokenizer(t)["input_ids"] if prefix is None else encode_after(tokenizer, t, prefix) for t in prompts]
    done = _sweep_results(loaded, intervention, coefficients, prompt_ids, settings, capture)
    tables = []
    for prompt_index, prompt in enumerate(prompts):
        for decoding in settings.decodings:
            for sample in range(settings.samples if decoding.sampled else 1):
                results = [done[decoding.name, prompt_index, sample, c] for c in range(len(coefficients))]
                texts = [loaded.tokenizer.decode(tokens, skip_special_tokens=True) for tokens, _ in results]
                tables.append(
                    pl.DataFrame(
                        {
                            "coefficient": list(coefficients),
                            "decoding": decoding.name,
                            "prompt_id": prompt_index,
                            "prompt": prompt,
                            "sample": sample,
                            "seed": [_row_seed(settings.seed, prompt_index, sample)] * len(coefficients),
                            "continuation": texts,
                            "sentiment": [sentiment(text) for text in texts],
                            "perplexity": [perplexity(score) for _, score in results],
                        }
                    )
                )
    return pl.concat(tables)


def _setting_columns(
    loaded: LoadedModel,
    intervention: Intervention,
    texts: Sequence[str],
    norms: Mapping[int, float],
    n: int,
    prefix: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Off-target KL and relative intervention norm per strength (texts after ``prefix``, if one is given)."""
    encoded = texts if prefix is None else [encode_after(loaded.tokenizer, text, prefix) for text in texts]
    kl = off_target_kl(loaded, encoded, intervention, n).numpy()
    return {"off_target_kl": kl, "relative_norm": relative_norm(intervention.change_norms(loaded.parts), norms)}


def sweep(
    loaded: LoadedModel,
    method: str,
    data: SteeringData,
    section: Mapping[str, Any],
    store: ActivationStore,
    capture: StateCapture | None = None,
) -> pl.DataFrame:
    """The layer x strength sweep of one generation method (``actadd``, ``mean_difference`` or ``icv``).

    ``capture`` keeps the generated tokens' states (its records name the steered ``layer``).
    """
    settings = SweepSettings.from_config(section)
    options = section.get(method, {})
    coefficients = [float(c) for c in options["coefficients"]]
    # Every method's prompts, contrast texts and off-target texts after one start token that no vector edits
    # (METHODS §7.2): the methods share one unsteered baseline, and none moves the attention sink.
    prefix = prefix_tokens(loaded.tokenizer, section.get("prefix", "auto"))
    builders: dict[str, Callable[[int], Intervention]] = {
        "actadd": lambda layer: ResidualAddition(
            layer,
            actadd_vector(loaded, data.actadd_positive, data.actadd_negative, layer, prefix),
            coefficients,
            "front",
            start=len(prefix),
        ),
        "mean_difference": lambda layer: ResidualAddition(
            layer, mean_difference_vector(loaded, data.contrast_pairs, layer, prefix), coefficients, "all", len(prefix)
        ),
        "icv": lambda layer: MlpShift(
            icv_vectors(loaded, data.icv_demonstrations, options.get("variant", "pca+mean"), prefix),
            coefficients,
            options.get("site", "mlp"),
        ),
    }
    if method not in builders:
        raise ValueError(f"unknown generation method {method!r}; use one of {', '.join(builders)}")
    layers = [0] if method == "icv" else list(section.get("layers", [6]))
    norms = typical_norms(store, range(1, loaded.n_layers + 1) if method == "icv" else layers)
    tables = []
    for layer in layers:
        intervention = builders[method](layer)
        setting = _setting_columns(loaded, intervention, data.off_target_texts, norms, len(coefficients), prefix)
        prompts = data.neutral_prompts[: section.get("max_prompts") or None]
        if capture is not None:
            capture.context["layer"] = layer
        table = continuations_table(
            loaded, intervention, coefficients, prompts, settings, prefix=prefix, capture=capture
        )
        per_setting = pl.DataFrame({"coefficient": coefficients, **setting})
        tables.append(table.join(per_setting, on="coefficient").with_columns(layer=pl.lit(layer)))
    label = "all blocks (MLP outputs)" if method == "icv" else "resid"
    table = pl.concat(tables).with_columns(method=pl.lit(method), site=pl.lit(label))
    # the start token every prompt had (empty: none)
    return table.with_columns(prefix=pl.lit(loaded.tokenizer.decode(prefix)), prefix_ids=pl.lit(str(prefix)))


@dataclass(frozen=True)
class HeadSelection:
    """ITI's choice, made without the test items: probes fitted on train, heads ranked on validation.

    ``validation_accuracy`` and ``shuffled_validation_accuracy`` are ``(L, H)``; ``heads`` carry the mass-mean
    directions and stds of the train and validation statements; ``statements`` counts each split's statements.
    """

    probes: HeadProbes
    validation_accuracy: torch.Tensor
    shuffled_validation_accuracy: torch.Tensor
    heads: list[HeadDirection]
    statements: dict[str, int]


def _head_dim(loaded: LoadedModel) -> int:
    config = loaded.model.config
    return getattr(config, "head_dim", None) or loaded.d_model // config.num_attention_heads


def select_iti_heads(loaded: LoadedModel, statements: Statements, k: int, seed: int = 0) -> HeadSelection:
    """Fit one probe per head on the train split, rank heads by validation accuracy, keep the top ``k``.

    Only the train and validation statements reach the model here (Li et al.'s ``get_top_heads`` and
    ``get_com_directions``): directions and stds are computed over both, never over a test item.
    """
    train, validation = statements.select("train"), statements.select("validation")
    head_dim = _head_dim(loaded)
    train_x, validation_x = (head_activations(loaded, part.texts(), head_dim) for part in (train, validation))
    train_y, validation_y = (torch.from_numpy(part.labels()) for part in (train, validation))
    probes = fit_head_probes(train_x, train_y, seed=seed)
    accuracy = probes.accuracy(validation_x, validation_y)
    heads = iti_heads(torch.cat([train_x, validation_x]), torch.cat([train_y, validation_y]), top_heads(accuracy, k))
    counts = {"train": len(train_y), "validation": len(validation_y)}
    return HeadSelection(probes, accuracy, probes.accuracy(validation_x, validation_y, shuffled=True), heads, counts)


def _probe_table(selection: HeadSelection, test_x: torch.Tensor, test_y: torch.Tensor) -> pl.DataFrame:
    """One row per head: validation accuracy (what ranks it), test accuracy (what is reported), their n.

    Each head also keeps its probe's (and its shuffled twin's) correctness on every test statement
    (``test_correct``, ``shuffled_test_correct``: lists in the order of the statements, two per item), from
    which :func:`iti_probe_intervals` adds the item-bootstrap interval of both accuracies.
    """
    n_layers, n_heads = selection.validation_accuracy.shape
    rank = torch.empty(n_layers * n_heads, dtype=torch.long)
    rank[[layer * n_heads + head for layer, head in top_heads(selection.validation_accuracy, n_layers * n_heads)]] = (
        torch.arange(1, n_layers * n_heads + 1)
    )
    selected = {(head.layer, head.head) for head in selection.heads}
    layers, heads = np.repeat(np.arange(1, n_layers + 1), n_heads), np.tile(np.arange(n_heads), n_layers)
    correct = (selection.probes.correct(test_x, test_y, shuffled=shuffled) for shuffled in (False, True))
    test_correct, shuffled_correct = (c.reshape(len(test_y), -1).T.numpy().tolist() for c in correct)
    table = pl.DataFrame(
        {
            "layer": layers,
            "head": heads,
            "validation_accuracy": selection.validation_accuracy.flatten().numpy(),
            "shuffled_validation_accuracy": selection.shuffled_validation_accuracy.flatten().numpy(),
            "validation_rank": rank.numpy(),
            "selected": [(int(layer), int(head)) in selected for layer, head in zip(layers, heads, strict=True)],
            "test_accuracy": selection.probes.accuracy(test_x, test_y).flatten().numpy(),
            "shuffled_test_accuracy": selection.probes.accuracy(test_x, test_y, shuffled=True).flatten().numpy(),
            "train_statements": selection.statements["train"],
            "validation_statements": selection.statements["validation"],
            "test_statements": len(test_y),
            "test_correct": test_correct,
            "shuffled_test_correct": shuffled_correct,
        },
        schema_overrides={"test_correct": pl.List(pl.Boolean), "shuffled_test_correct": pl.List(pl.Boolean)},
    )
    return iti_probe_intervals(table)


def run_iti(
    loaded: LoadedModel,
    statements: Statements,
    data: SteeringData,
    section: Mapping[str, Any],
    store: ActivationStore,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """ITI: heads chosen on train/validation (:func:`select_iti_heads`), then measured on the test items only.

    Returns the per-strength table (truth accuracy on test items, off-target KL, relative norm, and each test
    item's log-probability margin in ``test_item_margins``, the items in one order in every row, so that
    accuracy can be resampled by item and paired across strengths) and the per-head probe table (validation
    accuracy, which ranked the heads; test accuracy, for the heat-map).
    """
    options = section.get("iti", {})
    strengths = [float(s) for s in options["strengths"]]
    selection = select_iti_heads(loaded, statements, options.get("heads", 12), seed=section.get("seed", 0))
    test = statements.select("test")
    test_x = head_activations(loaded, test.texts(), _head_dim(loaded))
    probe_table = _probe_table(selection, test_x, torch.from_numpy(test.labels()))
    intervention = HeadShift(selection.heads, _head_dim(loaded), strengths)
    intervention.from_position = 0  # off-target text: every position, as if it were being generated
    norms = typical_norms(store, [head.layer for head in selection.heads])
    setting = _setting_columns(loaded, intervention, data.off_target_texts, norms, len(strengths))
    names = {"truth_accuracy": "test_truth_accuracy", "mean_log_prob_margin": "test_mean_log_prob_margin"}
    names |= {"items": "test_items", "item_margins": "test_item_margins"}
    truth = truth_accuracy(loaded, test, intervention, strengths).rename(names)
    table = pl.DataFrame({"coefficient": strengths, **setting}).join(truth, on="coefficient")
    return table.with_columns(method=pl.lit("iti"), heads=pl.lit(len(selection.heads))), probe_table


@torch.no_grad()
def truth_accuracy(
    loaded: LoadedModel,
    statements: Statements,
    intervention: HeadShift,
    strengths: Sequence[float],
    batch_items: int = 16,
) -> pl.DataFrame:
    """Per strength: how often the true object is more probable than the false one, over every item given.

    ``item_margins`` keeps each item's margin log p(true) − log p(false) (a list, in the order of the items;
    the item is correct when its margin is positive), for intervals that resample items.

    Each completion is scored by teacher forcing with the shift applied from the prompt's last token on,
    which is what generation would have done; ``batch_items`` items (x strengths x 2 completions) per pass.
    The caller passes the items to score (:func:`run_iti`: the test split only).
    """
    n_items = len(statements.prompts)
    margins = np.zeros((n_items, len(strengths)))
    for start in range(0, n_items, batch_items):
        items = range(start, min(start + batch_items, n_items))
        prompts, continuations, coefficients = [], [], []
        for item in items:
            prompt = loaded.tokenizer(statements.prompts[item])["input_ids"]
            for strength in strengths:
                for obj in (statements.true_objects[item], statements.false_objects[item]):
                    prompts.append(prompt)
                    continuations.append(loaded.tokenizer(f" {obj}", add_special_tokens=False)["input_ids"])
                    coefficients.append(strength)
        rows = intervention.with_coefficients(coefficients)
        rows.from_position = [len(prompt) - 1 for prompt in prompts]  # type: ignore[attr-defined]
        scores = [float(score.sum()) for score in continuation_log_probs(loaded, prompts, continuations, rows)]
        pairs = np.array(scores).reshape(len(items), len(strengths), 2)
        margins[start : start + len(items)] = pairs[..., 0] - pairs[..., 1]
    return pl.DataFrame(
        {
            "coefficient": list(strengths),
            "truth_accuracy": (margins > 0).mean(0),
            "mean_log_prob_margin": margins.mean(0),
            "items": n_items,
            "item_margins": [margins[:, column].tolist() for column in range(len(strengths))],
        },
        schema_overrides={"item_margins": pl.List(pl.Float64)},
    )


def run_optimised(
    loaded: LoadedModel, data: SteeringData, section: Mapping[str, Any], store: ActivationStore
) -> pl.DataFrame:
    """Optimise one vector per target sentence and record recovery (exact match, BLEU) and norm.

    Meant for a float32 model (the rule loads one whatever ``steering.model_dtype`` says; see the module's notes).
    """
    options = section.get("optimised", {})
    layer = int(options.get("layer", loaded.n_layers // 2))
    norm = typical_norms(store, [layer])[layer]
    prefix = prefix_tokens(loaded.tokenizer, options.get("prefix", "auto"), "steering.optimised.prefix")
    rows = []
    for index, sentence in enumerate(data.target_sentences):
        torch.manual_seed(section.get("seed", 0))
        result = optimise_vector(
            loaded,
            sentence,
            layer,
            steps=options.get("steps", 300),
            learning_rate=options.get("learning_rate", 0.05),
            check_every=options.get("check_every", 1),
            prefix=prefix,
        )
        target = loaded.tokenizer(sentence, add_special_tokens=False)["input_ids"]
        rows.append(
            {
                "target_id": index,
                "target": sentence,
                "layer": layer,
                "recovered": loaded.tokenizer.decode(result.recovered),
                "exact_match": result.exact,
                "bleu": sentence_bleu(target, result.recovered),
                "steps": result.steps,
                "final_loss": result.losses[-1],
                "relative_norm": float(result.vector.norm()) / norm,
                "first_token_recovered": result.recovered[:1] == target[:1],
                "prefix": loaded.tokenizer.decode(prefix),
                "start": loaded.tokenizer.decode([start_token(loaded.tokenizer, prefix)]),
            }
        )
    return pl.DataFrame(rows).with_columns(method=pl.lit("optimised"))
