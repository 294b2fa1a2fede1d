"""What the workflow's lens rules call: build every lens for a model, train the tuned lens, evaluate.

Precision: lenses stay in float32 on every device (the rules load the model with the default dtype), by
decision. Training and evaluation run no forward passes at all (they read stored states and apply the frozen
final norm and unembedding), so half precision would buy nothing there but error: KL and cross-entropy over a
49k-262k vocabulary are sums of many small terms, the tuned lens is trained by SGD on the translators, and the
checks of METHODS §10 are exact ones (the logit lens at the last layer reproduces the model's logits, the
untrained tuned lens equals the logit lens). ``read_probe``'s patchscopes do run the model, and a
bfloat16 forward beside float32 lens math would make the probe's lens readings and its patchscope
continuations disagree in precision for one point's worth of work, so they stay in float32 too.
"""

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch

from latent_atlas.config import select_layers
from latent_atlas.lenses.base import Lens, Unembed
from latent_atlas.lenses.evaluate import curves_from_documents, evaluate_lenses_by_document, evaluation_tokens
from latent_atlas.lenses.inverse_embedding import InverseEmbeddingLens
from latent_atlas.lenses.logit import LogitLens
from latent_atlas.lenses.semantic_basis import SemanticBasisLens
from latent_atlas.lenses.tuned import (
    HeldOutStopping,
    TrainingBatch,
    TunedLens,
    hold_out_documents,
    sampled_batches,
    train_tuned_lens,
    training_settings,
)
from latent_atlas.linalg import PseudoInverse
from latent_atlas.models import LoadedModel
from latent_atlas.provenance import provenance_record
from latent_atlas.stats import DEFAULT_REPLICATES
from latent_atlas.store import ActivationStore

CURVE_COLUMNS = (
    *("model", "corpus", "split", "lens", "address", "layer", "metric", "value", "n_tokens", "temperature"),
    *("ci_low", "ci_high", "n", "unit"),
)
DEFAULT_GRID_TEXT = "The Eiffel Tower is located in the city of Paris, the capital of France."


def lens_layers(settings: Mapping[str, Any], store: ActivationStore) -> list[int]:
    """The layers the lens section selects, for the model the store was made from."""
    return select_layers(settings.get("layers", "all"), int(store.attrs["n_layers"]), "lenses.layers")


def build_lenses(
    loaded: LoadedModel,
    settings: Mapping[str, Any],
    tuned: TunedLens | None,
    pinvs: Mapping[str, PseudoInverse] | None = None,
) -> dict[str, Lens]:
    """Every lens of METHODS §1-4 for one model, keyed by name (the ``lens`` column).

    The lenses share one frozen unembedding: the tuned lens's when it is given, else a fresh copy. ``pinvs``
    holds already computed pseudo-inverses (``head``: (W_U^T)^+, ``embed``: (W_E^T)^+; the probe caches them).
    """
    pinvs = pinvs or {}
    unembed = tuned.unembed if tuned is not None else Unembed.from_parts(loaded.parts)
    embedding = loaded.parts.embed.weight
    temperature = settings.get("semantic_basis", {}).get("temperature", 0.05)
    semantic = SemanticBasisLens(unembed, temperature=temperature, pinv=pinvs.get("head"))
    tied = torch.equal(embedding, loaded.parts.lm_head.weight)
    lenses: list[Lens] = [
        LogitLens(unembed),
        semantic,
        InverseEmbeddingLens(embedding, "transpose"),
        InverseEmbeddingLens(embedding, "pinv", transposed_pinv=semantic.pinv if tied else pinvs.get("embed")),
    ]
    if tuned is not None:
        lenses.insert(1, tuned)
    return {lens.name: lens for lens in lenses}


def load_lenses(
    loaded: LoadedModel, tuned_path: str | os.PathLike[str] | None, settings: Mapping[str, Any]
) -> dict[str, Lens]:
    """:func:`build_lenses` with the tuned lens loaded from ``tuned_path`` (if given)."""
    tuned = TunedLens.load(tuned_path, Unembed.from_parts(loaded.parts)) if tuned_path else None
    return build_lenses(loaded, settings, tuned)


def train_tuned_lens_on_store(
    loaded: LoadedModel,
    store_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    settings: Mapping[str, Any],
    on_step: Callable[[int, float], None] | None = None,
) -> TunedLens:
    """Train translators for the lens layers on the store's training split and save them."""
    tuned_settings = settings.get("tuned", {})
    training = training_settings(tuned_settings)
    unembed = Unembed.from_parts(loaded.parts)
    lens = TunedLens(unembed, loaded.n_layers, loaded.d_model)
    with ActivationStore(store_path, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        layers = lens_layers(settings, store)
        split, skip_first = tuned_settings.get("split", "train"), settings.get("skip_first_position", True)
        budget, seed = tuned_settings.get("train_tokens"), training.seed
        layers = [layer for layer in layers if layer < lens.n_layers]
        stopping = None
        if training.validation_tokens:
            every = evaluation_tokens(store, split, None, skip_first, seed=seed)
            train_rows, held_rows = hold_out_documents(every.rows, every.docs, training.validation_tokens, seed)
            train_rows = _sample_rows(train_rows, budget, seed)
            stopping = HeldOutStopping(
                _stored_batch(store, held_rows, layers), training.eval_every, training.patience,
                training.min_improvement,
            )  # fmt: skip
        else:
            train_rows = evaluation_tokens(store, split, budget, skip_first, seed).rows
        final = torch.from_numpy(store.read("ln_final", train_rows))
        batches = sampled_batches(lambda k: torch.from_numpy(store.read(k, train_rows)), final, layers, training)
        losses = train_tuned_lens(lens, batches, layers, training, on_step, stopping)
        extra = provenance_record(
            dict(settings), store=str(store_path), train_tokens=len(train_rows), losses=losses, steps_run=len(losses),
            tokens_seen=len(losses) * min(training.tokens_per_step, len(train_rows)),
            validation_tokens=0 if stopping is None else len(stopping.batch.final),
            validation_curve=[] if stopping is None else stopping.curve,
        )  # fmt: skip
    lens.save(out_path, extra=extra)
    return lens


def _sample_rows(rows: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """At most ``count`` of ``rows``, sampled without replacement by ``seed``, sorted (all when None)."""
    if not count or len(rows) <= count:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False))


def _stored_batch(store: ActivationStore, rows: np.ndarray, layers: Sequence[int]) -> TrainingBatch:
    """The stored states of ``rows`` at ``layers`` and after the final norm, as one batch."""
    states = {layer: torch.from_numpy(store.read(layer, rows)) for layer in layers}
    return TrainingBatch(states, torch.from_numpy(store.read("ln_final", rows)))


def evaluate_lenses_on_store(
    loaded: LoadedModel,
    store_path: str | os.PathLike[str],
    tuned_path: str | os.PathLike[str] | None,
    settings: Mapping[str, Any],
) -> pl.DataFrame:
    """The curves of :func:`evaluate_lenses_with_documents` alone."""
    return evaluate_lenses_with_documents(loaded, store_path, tuned_path, settings)[0]


def evaluate_lenses_with_documents(
    loaded: LoadedModel,
    store_path: str | os.PathLike[str],
    tuned_path: str | os.PathLike[str] | None,
    settings: Mapping[str, Any],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Evaluate every lens at every lens layer on the held-out split: (curves, per-document sums).

    The curves are in long format with provenance columns and a document-bootstrap interval per row
    (``ci_low, ci_high, n, unit``; 1000 replicates, seeded by ``lenses.seed``); the per-document sums
    (:func:`~latent_atlas.lenses.evaluate.evaluate_lenses_by_document`) are what paired comparisons of two
    lenses resample.

    Scale-free lenses (semantic basis, inverse embedding) first get one temperature per layer, fitted on
    tokens of the training split (``lenses.temperature``); it is the ``temperature`` column of their rows
    (null for readers with a natural scale). The identity patchscope is evaluated beside the lenses on the
    same tokens and layers (``lenses.patchscope.evaluate``).
    """
    from latent_atlas.lenses.patchscope import IdentityPatchscope
    from latent_atlas.lenses.temperature import fit_lens_temperatures

    unembed = Unembed.from_parts(loaded.parts)
    tuned = TunedLens.load(tuned_path, unembed) if tuned_path else None
    lenses = build_lenses(loaded, settings, tuned)
    skip_first, seed = settings.get("skip_first_position", True), settings.get("seed", 0)
    fit, scope = settings.get("temperature", {}), settings.get("patchscope", {})
    temperatures = pl.DataFrame(schema={"lens": pl.String, "layer": pl.Int64, "temperature": pl.Float64})
    with ActivationStore(store_path, expect={"model_sha256": loaded.manifest["weights_sha256"]}) as store:
        layers = lens_layers(settings, store)
        if fit.get("fit", True):
            train = evaluation_tokens(store, fit.get("split", "train"), fit.get("tokens", 128), skip_first, seed=seed)
            lenses, temperatures = fit_lens_temperatures(
                store, unembed, lenses, layers, train, settings.get("chunk_size", 256)
            )
        if scope.get("evaluate", True):
            lenses["patchscope_identity"] = IdentityPatchscope(loaded, batch_size=scope.get("batch_size", 256))
        tokens = evaluation_tokens(
            store, settings.get("split", "heldout"), settings.get("max_tokens"), skip_first, seed=seed
        )
        documents, ranks = evaluate_lenses_by_document(
            store, unembed, lenses, layers, tokens, settings.get("chunk_size", 256)
        )
        attrs = store.attrs
    table = curves_from_documents(documents, ranks, DEFAULT_REPLICATES, seed)
    provenance = {
        "model": pl.lit(attrs["model"]),
        "corpus": pl.lit(attrs["corpus"]),
        "split": pl.lit(settings.get("split", "heldout")),
    }
    curves = (
        table.join(temperatures, on=["lens", "layer"], how="left").with_columns(**provenance).select(*CURVE_COLUMNS)
    )
    return curves, documents.with_columns(**provenance)


def read_probe(
    loaded: LoadedModel,
    name: str,
    probes: Mapping[str, Mapping[str, Any]],
    tuned_path: str | os.PathLike[str] | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Resolve a configured probe and read it with every lens and patchscope.

    A text probe also records where it was read: ``token`` (the token at ``position`` of ``n_tokens``) and
    ``model_prediction``, the model's own top-k next tokens there, which the lenses' readings are set against.
    """
    from latent_atlas.lenses.probe import probe_vector, read_point, read_text

    vector, layer = probe_vector(loaded, name, probes)
    spec, k = probes[name], settings.get("top_k", 10)
    context: dict[str, Any] = {}
    if "text" in spec:
        point = read_text(loaded, spec["text"], [], int(spec.get("position", -1)), k)
        context = {"token": point.token, "position": point.position, "n_tokens": point.n_tokens}
        context["model_prediction"] = point.prediction
    scope = settings.get("patchscope", {})
    reading = read_point(
        loaded,
        load_lenses(loaded, tuned_path, settings),
        vector,
        layer,
        k=k,
        targets=scope.get("targets", ("identity", "entity_description")),
        max_new_tokens=scope.get("max_new_tokens", 20),
    )
    return {"probe": name, "spec": dict(spec), **context, **reading}


def project_parameters(
    loaded: LoadedModel, settings: Mapping[str, Any], texts: Sequence[str] | None = None
) -> dict[str, pl.DataFrame]:
    """MLP key/value and head OV/QK projections to the vocabulary, with decoded tokens (METHODS §3).

    With ``texts`` (held-out documents, in the order to read them) the tables include ``recall``: Dar et al.'s
    aligned-vs-shuffled recall of each state's projection by its activated neurons' keys and values.
    """
    from latent_atlas.lenses.projections import (
        activation_recall,
        collect_recall_states,
        mlp_token_ids,
        project_heads,
        project_mlp,
    )

    mlp_layers = [layer for layer in select_layers(settings.get("mlp_layers", [1]), loaded.n_layers) if layer > 0]
    top_k, overlap_k, recall_k = settings.get("top_k", 10), settings.get("overlap_k", 100), settings.get("recall_k", 50)
    token_ids = mlp_token_ids(loaded, mlp_layers, max(top_k, overlap_k, recall_k if texts is not None else 0))
    seed = settings.get("seed", 0)
    mlp_tokens, alignment = project_mlp(loaded, mlp_layers, top_k, overlap_k, seed, token_ids)
    recall = None
    if texts is not None:
        states = collect_recall_states(
            loaded, texts, mlp_layers, settings.get("recall_positions", 1000), settings.get("recall_max_length", 256)
        )
        recall = activation_recall(loaded, states, token_ids, settings.get("recall_neurons", 5), recall_k, seed)
    size = settings.get("head_vocabulary_size")
    vocabulary = torch.arange(min(size, loaded.manifest["vocab_size"])) if size else None
    head_layers = [layer for layer in select_layers(settings.get("head_layers", [1]), loaded.n_layers) if layer > 0]
    heads = project_heads(loaded, head_layers, settings.get("head_top_k", 20), vocabulary)
    decode = _decoder(loaded)
    return {
        "mlp": mlp_tokens.with_columns(token=pl.col("token_id").map_elements(decode, return_dtype=pl.String)),
        "heads": heads.with_columns(
            source=pl.col("source_id").map_elements(decode, return_dtype=pl.String),
            target=pl.col("target_id").map_elements(decode, return_dtype=pl.String),
        ),
        "alignment": alignment,
    } | ({} if recall is None else {"recall": recall})


def _decoder(loaded: LoadedModel) -> Callable[[int], str]:
    """Decode one token id, memoised (token tables repeat ids a lot)."""

    @functools.cache
    def decode(token_id: int) -> str:
        return loaded.tokenizer.decode([token_id])

    return decode


def grid_for_text(loaded: LoadedModel, tuned_path: str | os.PathLike[str], settings: Mapping[str, Any]) -> pl.DataFrame:
    """The logit- and tuned-lens token grid of the configured example sentence at the lens layers."""
    from latent_atlas.lenses.grid import token_grid

    unembed = Unembed.from_parts(loaded.parts)
    lenses = {"logit": LogitLens(unembed), "tuned": TunedLens.load(tuned_path, unembed)}
    layers = select_layers(settings.get("layers", "all"), loaded.n_layers)
    return token_grid(loaded, lenses, settings.get("grid_text", DEFAULT_GRID_TEXT), layers)
