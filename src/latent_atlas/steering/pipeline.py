"""What the steering rules call: one sweep per method, evaluated into long tables.

Every generation method (ActAdd, mean difference, in-context vectors) is swept over layers x strengths,
each prompt continued under all strengths of a layer in one batch, greedy and sampled. Each row of the
table is one continuation with its sentiment (VADER compound, from -1 to 1), its perplexity under the
unsteered model, and its setting's off-target damage (KL from the unsteered next-token distribution on
neutral text) and intervention norm relative to the typical norm of the layers it edits.

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
    continuation_log_probs,
    cut_at_eos,
    generate,
    off_target_kl,
    perplexity,
)
from latent_atlas.steering.interventions import HeadShift, Intervention, MlpShift, ResidualAddition
from latent_atlas.steering.vectors import (
    actadd_vector,
    fit_head_probes,
    head_activations,
    icv_vectors,
    iti_heads,
    mean_difference_vector,
    optimise_vector,
    sentence_bleu,
)
from latent_atlas.store import ActivationStore

GENERATION_METHODS = ("actadd", "mean_difference", "icv")
METHODS = (*GENERATION_METHODS, "iti", "optimised")


@dataclass(frozen=True)
class SweepSettings:
    """How continuations are generated and how many."""

    max_new_tokens: int = 20
    decodings: tuple[Decoding, ...] = (Decoding("greedy"), Decoding("sampled"))
    samples: int = 1
    seed: int = 0

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "SweepSettings":
        """Build from the ``steering`` config section."""
        decodings = tuple(
            Decoding(name, section.get("temperature", 1.0), section.get("top_p", 0.9))
            for name in section.get("decodings", ["greedy", "sampled"])
        )
        return cls(section.get("max_new_tokens", 20), decodings, section.get("samples", 1), section.get("seed", 0))


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


def continuations_table(
    loaded: LoadedModel,
    intervention: Intervention,
    coefficients: Sequence[float],
    prompts: Sequence[str],
    settings: SweepSettings,
    sentiment: Callable[[str], float] | None = None,
) -> pl.DataFrame:
    """Continue every prompt under every strength (one batch per prompt, decoding and sample)."""
    sentiment = sentiment or _Sentiment()
    tables = []
    for prompt_index, prompt in enumerate(prompts):
        prompt_ids = loaded.tokenizer(prompt)["input_ids"]
        for decoding in settings.decodings:
            for sample in range(settings.samples if decoding.sampled else 1):
                seeds = [_row_seed(settings.seed, prompt_index, sample)] * len(coefficients)
                tokens = generate(
                    loaded, prompt, intervention, len(coefficients), settings.max_new_tokens, decoding, seeds
                )
                rows = cut_at_eos(tokens, loaded.tokenizer.eos_token_id)
                scores = continuation_log_probs(loaded, prompt_ids, rows)
                texts = [loaded.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
                tables.append(
                    pl.DataFrame(
                        {
                            "coefficient": list(coefficients),
                            "decoding": decoding.name,
                            "prompt_id": prompt_index,
                            "prompt": prompt,
                            "sample": sample,
                            "seed": seeds,
                            "continuation": texts,
                            "sentiment": [sentiment(text) for text in texts],
                            "perplexity": [perplexity(score) for score in scores],
                        }
                    )
                )
    return pl.concat(tables)


def _setting_columns(
    loaded: LoadedModel, intervention: Intervention, texts: Sequence[str], norms: Mapping[int, float], n: int
) -> dict[str, np.ndarray]:
    """Off-target KL and relative intervention norm per strength."""
    kl = off_target_kl(loaded, texts, intervention, n).numpy()
    return {"off_target_kl": kl, "relative_norm": relative_norm(intervention.change_norms(loaded.parts), norms)}


def sweep(
    loaded: LoadedModel,
    method: str,
    data: SteeringData,
    section: Mapping[str, Any],
    store: ActivationStore,
) -> pl.DataFrame:
    """The layer x strength sweep of one generation method (``actadd``, ``mean_difference`` or ``icv``)."""
    settings = SweepSettings.from_config(section)
    options = section.get(method, {})
    coefficients = [float(c) for c in options["coefficients"]]
    builders: dict[str, Callable[[int], Intervention]] = {
        "actadd": lambda layer: ResidualAddition(
            layer, actadd_vector(loaded, data.actadd_positive, data.actadd_negative, layer), coefficients, "front"
        ),
        "mean_difference": lambda layer: ResidualAddition(
            layer, mean_difference_vector(loaded, data.contrast_pairs, layer), coefficients, "all"
        ),
        "icv": lambda layer: MlpShift(
            icv_vectors(loaded, data.icv_demonstrations, options.get("variant", "pca+mean")),
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
        setting = _setting_columns(loaded, intervention, data.off_target_texts, norms, len(coefficients))
        prompts = data.neutral_prompts[: section.get("max_prompts") or None]
        table = continuations_table(loaded, intervention, coefficients, prompts, settings)
        per_setting = pl.DataFrame({"coefficient": coefficients, **setting})
        tables.append(table.join(per_setting, on="coefficient").with_columns(layer=pl.lit(layer)))
    label = "all blocks (MLP outputs)" if method == "icv" else "resid"
    return pl.concat(tables).with_columns(method=pl.lit(method), site=pl.lit(label))


def run_iti(
    loaded: LoadedModel,
    statements: Statements,
    data: SteeringData,
    section: Mapping[str, Any],
    store: ActivationStore,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """ITI: probes on every head, the top heads' shift swept over strengths, truth accuracy on held-out items.

    Returns the per-strength table and the per-head probe table (for the heat-map).
    """
    options = section.get("iti", {})
    strengths = [float(s) for s in options["strengths"]]
    head_dim = loaded.d_model // loaded.model.config.num_attention_heads
    head_dim = getattr(loaded.model.config, "head_dim", None) or head_dim
    labels = torch.from_numpy(statements.labels())
    train = torch.from_numpy(statements.train_rows())
    activations = head_activations(loaded, statements.texts(), head_dim)
    probes = fit_head_probes(activations, labels, train, seed=section.get("seed", 0))
    heads = iti_heads(activations, labels, train, probes.accuracy, options.get("heads", 12))
    intervention = HeadShift(heads, head_dim, strengths)
    intervention.from_position = 0  # off-target text: every position, as if it were being generated
    norms = typical_norms(store, [head.layer for head in heads])
    setting = _setting_columns(loaded, intervention, data.off_target_texts, norms, len(strengths))
    truth = truth_accuracy(loaded, statements, intervention, strengths)
    table = pl.DataFrame({"coefficient": strengths, **setting}).join(truth, on="coefficient")
    selected = {(head.layer, head.head) for head in heads}
    n_layers, n_heads = probes.accuracy.shape
    probe_table = pl.DataFrame(
        {
            "layer": np.repeat(np.arange(1, n_layers + 1), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "accuracy": probes.accuracy.flatten().numpy(),
            "shuffled_accuracy": probes.shuffled_accuracy.flatten().numpy(),
        }
    ).with_columns(
        selected=pl.struct("layer", "head").map_elements(
            lambda row: (row["layer"], row["head"]) in selected, return_dtype=pl.Boolean
        )
    )
    return table.with_columns(method=pl.lit("iti"), heads=pl.lit(len(heads))), probe_table


@torch.no_grad()
def truth_accuracy(
    loaded: LoadedModel,
    statements: Statements,
    intervention: HeadShift,
    strengths: Sequence[float],
    batch_items: int = 16,
) -> pl.DataFrame:
    """Per strength: how often the true object is more probable than the false one on held-out items.

    Each completion is scored by teacher forcing with the shift applied from the prompt's last token on,
    which is what generation would have done; ``batch_items`` items (x strengths x 2 completions) per pass.
    """
    held_out = np.flatnonzero(~statements.train_items)
    margins = np.zeros((len(held_out), len(strengths)))
    for start in range(0, len(held_out), batch_items):
        items = held_out[start : start + batch_items]
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
            "held_out_items": len(held_out),
        }
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
            }
        )
    return pl.DataFrame(rows).with_columns(method=pl.lit("optimised"))
