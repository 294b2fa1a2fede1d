"""What the atlas page shows, computed from the store as plain JSON-ready dicts (the page only displays).

For a sample of documents of one split (a few per label, round-robin over labels, seeded), at each atlas layer:

- the top-k tokens and probabilities of the logit lens and (where it reads the layer) the tuned lens, the KL of
  the model's final distribution to the lens's (nats) and whether the lens's top-1 is the final top-1;
- the state's norm relative to the layer's typical norm (median ‖h‖ of the stored states), flagged massive
  above ``massive_multiple`` (geometry's threshold);
- the exact nearest stored states (:func:`~latent_atlas.neighbourhood.knn.nearest_stored`, the neighbourhood
  analysis's search), the query's own row left out, with the text around each neighbour's token;

and per token the model's own next-token prediction (``lm_head(ln_final)``) and, per lens, the first atlas layer
whose top-1 is the final top-1. Token ids are stored once; ``vocab`` decodes every id used.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.nn import functional

from latent_atlas.config import LayerSpec, select_layers
from latent_atlas.errors import ConfigError
from latent_atlas.lenses.base import Lens, Unembed
from latent_atlas.lenses.logit import LogitLens
from latent_atlas.lenses.tuned import TunedLens
from latent_atlas.models import LoadedModel
from latent_atlas.neighbourhood.knn import DEFAULT_BLOCK_ROWS, layer_statistics, nearest_stored, typical_norm
from latent_atlas.store import ActivationStore


@dataclass(frozen=True)
class AtlasSettings:
    """The ``atlas`` config section (``neighbours`` flattened), plus geometry's ``massive_multiple``."""

    layers: LayerSpec = "all"
    split: str = "heldout"
    docs_per_label: int = 1
    max_tokens: int | None = 64
    top_k: int = 5
    neighbours_k: int = 5
    metric: str = "cosine"
    standardise: bool = False
    context_tokens: int = 6
    skip_first_position: bool = True
    massive_multiple: float = 10.0
    max_bytes: int = 4_000_000
    seed: int = 0
    chunk_size: int = 128
    block_rows: int = DEFAULT_BLOCK_ROWS

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "AtlasSettings":
        """Read the config section, ignoring keys the computation does not use (``models``)."""
        neighbours = section.get("neighbours", {})
        flat = {**section, **{f"neighbours_{key}" if key == "k" else key: value for key, value in neighbours.items()}}
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in flat.items() if key in known})


def sample_documents(docs: pl.DataFrame, split: str, per_label: int, seed: int) -> pl.DataFrame:
    """Up to ``per_label`` documents of each label of ``split``, seeded, in round-robin order over labels.

    Returns the rows of ``docs`` (the store's table) with their index ``doc`` and ``round`` (0 for each label's
    first document, ...): a page over budget drops the last rounds first.
    """
    table = docs.with_row_index("doc").with_columns(pl.col("doc").cast(pl.Int64))
    chosen = table.filter(pl.col("split") == split)
    if chosen.is_empty():
        splits = sorted(set(docs["split"].to_list()))
        raise ConfigError(
            f"atlas.split is {split!r}, but the store's documents are in splits {splits}; set atlas.split"
        )
    rng = np.random.default_rng(seed)
    picked = []
    for label in sorted(set(chosen["label"].to_list())):
        members = chosen.filter(pl.col("label") == label)
        order = rng.permutation(members.height)[:per_label]
        picked.append(members[order.tolist()].with_columns(round=pl.Series(np.arange(len(order)))))
    return pl.concat(picked).sort(["round", "label"], maintain_order=True)


def atlas_layers(spec: LayerSpec, store: ActivationStore) -> list[int]:
    """The layers ``atlas.layers`` selects that the store holds (at least one)."""
    wanted = select_layers(spec, int(store.attrs["n_layers"]))
    layers = [layer for layer in wanted if layer in store.layers]
    if not layers:
        raise ConfigError(
            f"atlas.layers selects {wanted}, none of which is stored in {store.path} (stored: {store.layers}); "
            "change atlas.layers or extraction.layers"
        )
    return layers


@dataclass(frozen=True)
class Tokens:
    """The sampled documents' token rows: one contiguous run of store rows per document."""

    starts: list[int]
    counts: list[int]

    @property
    def rows(self) -> np.ndarray:
        """Every row, documents in order."""
        return np.concatenate([np.arange(s, s + c) for s, c in zip(self.starts, self.counts, strict=True)])

    def read(self, store: ActivationStore, address: str | int) -> np.ndarray:
        """The states of every row at one address, one contiguous read per document."""
        return np.concatenate(
            [store.read(address, slice(s, s + c)) for s, c in zip(self.starts, self.counts, strict=True)]
        )


def _rounded(values: np.ndarray | torch.Tensor, digits: int) -> Any:
    """Values rounded for the page, as nested lists."""
    array = values.numpy() if isinstance(values, torch.Tensor) else values
    return np.round(array.astype(np.float64), digits).tolist()


@torch.no_grad()
def lens_readings(
    lenses: Mapping[str, Lens],
    unembed: Unembed,
    states: Mapping[int, np.ndarray],
    final: np.ndarray,
    top_k: int,
    chunk_size: int,
) -> dict[str, Any]:
    """Top-k of the model's own prediction and, per lens and layer, top-k, KL to the final distribution, agreement.

    Args:
        lenses: name -> lens; a lens that does not read a layer gets ``None`` there.
        unembed: the shared unembedding; ``unembed.lm_head(final)`` is the model's own distribution.
        states: layer -> ``(n, d)`` states of the same rows.
        final: ``(n, d)`` post-final-norm states (``ln_final``).
        top_k: tokens kept per reading.
        chunk_size: rows per pass (memory is O(chunk_size · V) per lens).

    Returns:
        ``{"model": {"ids", "probs"}, "lenses": {name: {layer: {"ids", "probs", "kl", "agree"} | None}}}``
        with arrays over all rows.
    """
    layers = sorted(states)
    parts: dict[str, dict[int, list[dict[str, torch.Tensor]]]] = {
        name: {layer: [] for layer in layers} for name in lenses
    }
    model_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(final), chunk_size):
        stop = min(start + chunk_size, len(final))
        target = functional.log_softmax(unembed.lm_head(torch.from_numpy(final[start:stop])).float(), dim=-1)
        top_target, ids = target.topk(top_k, dim=-1)
        model_parts.append((ids, top_target.exp()))
        p_target = target.exp()
        neg_entropy = torch.einsum("ij,ij->i", p_target, target)
        for name, lens in lenses.items():
            for layer in layers:
                if not lens.reads(layer):
                    continue
                logits = lens.logits(torch.from_numpy(states[layer][start:stop]), layer).float()
                log_probs = functional.log_softmax(logits, dim=-1)
                top_log_probs, top_ids = log_probs.topk(top_k, dim=-1)
                kl = neg_entropy - torch.einsum("ij,ij->i", p_target, log_probs)  # KL(p_final || p_lens)
                parts[name][layer].append(
                    {"ids": top_ids, "probs": top_log_probs.exp(), "kl": kl, "agree": top_ids[:, 0] == ids[:, 0]}
                )
    readings = {
        name: {layer: _joined(chunks) if chunks else None for layer, chunks in by_layer.items()}
        for name, by_layer in parts.items()
    }
    model = {"ids": torch.cat([i for i, _ in model_parts]), "probs": torch.cat([p for _, p in model_parts])}
    return {"model": model, "lenses": readings}


def _joined(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-chunk readings."""
    return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}


def first_agreeing_layer(agree: Mapping[int, torch.Tensor | None], n: int) -> list[int | None]:
    """Per row, the first layer (in order) whose lens top-1 is the final top-1; None where no layer agrees."""
    first: list[int | None] = [None] * n
    for layer in sorted(agree, reverse=True):
        values = agree[layer]
        if values is None:
            continue
        for row in np.flatnonzero(values.numpy()):
            first[int(row)] = layer
    return first


@dataclass(frozen=True)
class LayerNeighbours:
    """Exact neighbours of every query at one layer, the query's own row left out, and the layer's scale."""

    rows: np.ndarray
    scores: np.ndarray
    typical_norm: float


def neighbours_at(
    store: ActivationStore, layer: int, queries: np.ndarray, own_rows: np.ndarray, settings: AtlasSettings
) -> LayerNeighbours:
    """The ``neighbours_k`` nearest stored states of each query (not its own row) and the layer's typical norm."""
    if settings.standardise:
        statistics = layer_statistics(store, layer, settings.skip_first_position, settings.block_rows)
        scale = statistics.typical_norm
    else:
        statistics, scale = None, typical_norm(store, layer, settings.skip_first_position, settings.block_rows)
    k = settings.neighbours_k
    found = nearest_stored(
        store,
        layer,
        queries,
        k + 1,
        settings.metric,
        statistics,
        settings.skip_first_position,
        settings.block_rows,  # type: ignore[arg-type]
    )
    keep = found.rows != own_rows[:, None]
    rows = np.stack([row[mask][:k] for row, mask in zip(found.rows, keep, strict=True)])
    scores = np.stack([score[mask][:k] for score, mask in zip(found.scores, keep, strict=True)])
    return LayerNeighbours(rows, scores, scale)


def row_contexts(store: ActivationStore, rows: Sequence[int], window: int) -> dict[int, list[Any]]:
    """Each row's ``[document index, position, context token ids, offset of the row's token in them]``.

    The context is at most ``window`` tokens each side, within the row's document (as
    :func:`~latent_atlas.neighbourhood.knn.token_contexts`, but as ids: the page decodes them).
    """
    tokens = store.tokens()
    ids, docs, pos = (tokens[column].to_numpy() for column in ("token_id", "doc", "pos"))
    counts = store.docs()["token_count"].to_numpy()[docs]
    contexts = {}
    for row in sorted(set(map(int, rows))):
        left = row - min(window, int(pos[row]))
        right = row + min(window, int(counts[row] - pos[row] - 1))
        contexts[row] = [int(docs[row]), int(pos[row]), ids[left : right + 1].tolist(), row - left]
    return contexts


def steering_runs(tables: Mapping[str, pl.DataFrame]) -> list[dict[str, Any]]:
    """Steered continuations beside the unsteered one, per (prompt, decoding, sample).

    ``tables`` are the generation methods' tables (``results/steering/{model}/{method}.parquet``); the
    unsteered continuation is a row at coefficient 0 (every method has the same one).
    """
    columns = ["prompt_id", "prompt", "decoding", "sample", "method", "layer", "coefficient", "continuation"]
    frames = [table.select(*columns, pl.col("sentiment").cast(pl.Float64)) for table in tables.values()]
    if not frames:
        return []
    rows = pl.concat(frames).sort(["prompt_id", "decoding", "sample", "method", "layer", "coefficient"])
    runs = []
    for (prompt_id, decoding, sample), group in rows.group_by(["prompt_id", "decoding", "sample"], maintain_order=True):
        plain = group.filter(pl.col("coefficient") == 0)
        steered = group.filter(pl.col("coefficient") != 0)
        runs.append(
            {
                "prompt_id": int(prompt_id),  # type: ignore[call-overload]
                "prompt": group["prompt"][0],
                "decoding": decoding,
                "sample": int(sample),  # type: ignore[call-overload]
                "unsteered": plain["continuation"][0] if plain.height else None,
                "unsteered_sentiment": _maybe_round(plain["sentiment"][0]) if plain.height else None,
                "runs": [
                    {**row, "sentiment": _maybe_round(row["sentiment"])}
                    for row in steered.select("method", "layer", "coefficient", "continuation", "sentiment").to_dicts()
                ],
            }
        )
    return runs


def _maybe_round(value: float | None) -> float | None:
    """A score rounded for the page (None stays None)."""
    return None if value is None else round(float(value), 4)


def document_payloads(
    store: ActivationStore,
    documents: pl.DataFrame,
    lenses: Mapping[str, Lens],
    unembed: Unembed,
    layers: Sequence[int],
    settings: AtlasSettings,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[list[dict[str, Any]], dict[int, float], dict[int, list[Any]]]:
    """Per document: tokens, model prediction, lens readings, relative norms and neighbours at every layer.

    Returns ``(documents, typical norm per layer, contexts of every neighbour row)``.
    """
    limit = settings.max_tokens or None
    counts = [min(int(c), limit) if limit else int(c) for c in documents["token_count"]]
    tokens = Tokens([int(s) for s in documents["token_start"]], counts)
    rows = tokens.rows
    states = {layer: tokens.read(store, layer) for layer in layers}
    readings = lens_readings(
        lenses, unembed, states, tokens.read(store, "ln_final"), settings.top_k, settings.chunk_size
    )
    found = {}
    for layer in layers:
        found[layer] = neighbours_at(store, layer, states[layer], rows, settings)
        log(f"resid.{layer:02d}: lenses read, {len(rows)} queries searched")
    scales = {layer: found[layer].typical_norm for layer in layers}
    norms = {layer: np.linalg.norm(states[layer].astype(np.float64), axis=1) / scales[layer] for layer in layers}
    store_ids = store.tokens()["token_id"].to_numpy()
    payloads = []
    for index, document in enumerate(documents.iter_rows(named=True)):
        cut = slice(int(np.sum(counts[:index])), int(np.sum(counts[: index + 1])))
        payloads.append(
            _document(document, store_ids[rows[cut]], cut, readings, norms, found, layers, lenses, settings.top_k)
        )
    contexts = row_contexts(store, np.concatenate([f.rows.ravel() for f in found.values()]), settings.context_tokens)
    return payloads, scales, contexts


def _document(
    document: Mapping[str, Any],
    ids: np.ndarray,
    cut: slice,
    readings: Mapping[str, Any],
    norms: Mapping[int, np.ndarray],
    found: Mapping[int, LayerNeighbours],
    layers: Sequence[int],
    lenses: Mapping[str, Lens],
    top_k: int,
) -> dict[str, Any]:
    """One document's part of the page data (arrays indexed [layer index][token][rank])."""
    lens_part = {}
    for name in lenses:
        by_layer = readings["lenses"][name]
        cell = {
            layer: None if by_layer[layer] is None else {k: v[cut] for k, v in by_layer[layer].items()}
            for layer in layers
        }
        lens_part[name] = {
            "ids": [None if cell[layer] is None else cell[layer]["ids"].tolist() for layer in layers],
            "probs": [None if cell[layer] is None else _rounded(cell[layer]["probs"], 4) for layer in layers],
            "kl": [None if cell[layer] is None else _rounded(cell[layer]["kl"], 4) for layer in layers],
            "agree": [None if cell[layer] is None else cell[layer]["agree"].int().tolist() for layer in layers],
            "first": first_agreeing_layer(
                {layer: None if cell[layer] is None else cell[layer]["agree"] for layer in layers}, len(ids)
            ),
        }
    return {
        "doc_id": document["doc_id"],
        "label": document["label"],
        "split": document["split"],
        "store_doc": int(document["doc"]),
        "token_start": int(document["token_start"]),
        "token_count": int(document["token_count"]),
        "round": int(document["round"]),
        "ids": ids.tolist(),
        "model": {
            "ids": readings["model"]["ids"][cut].tolist(),
            "probs": _rounded(readings["model"]["probs"][cut], 4),
        },
        "lenses": lens_part,
        "norm": [_rounded(norms[layer][cut], 3) for layer in layers],
        "neighbours": {
            "rows": [found[layer].rows[cut].tolist() for layer in layers],
            "scores": [_rounded(found[layer].scores[cut], 4) for layer in layers],
        },
        "top_k": top_k,
    }


def vocabulary(ids: Sequence[int], decode: Callable[[list[int]], str]) -> dict[str, str]:
    """The decoded text of each id (keys are the ids as strings, as JSON objects need)."""
    return {str(token): decode([token]) for token in sorted(set(map(int, ids)))}


def used_ids(documents: Sequence[Mapping[str, Any]], contexts: Mapping[int, list[Any]]) -> set[int]:
    """Every token id the page shows: documents, readings, predictions and neighbours' contexts."""
    used: set[int] = set()
    for document in documents:
        used.update(document["ids"])
        used.update(np.ravel(document["model"]["ids"]).tolist())
        for lens in document["lenses"].values():
            for layer in lens["ids"]:
                if layer is not None:
                    used.update(np.ravel(layer).tolist())
    for context in contexts.values():
        used.update(context[2])
    return used


def atlas_data(
    loaded: LoadedModel,
    store: ActivationStore,
    tuned: TunedLens | None,
    steering: Mapping[str, pl.DataFrame],
    settings: AtlasSettings,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Everything the page shows for one model x corpus (see the module docstring).

    Keys: ``meta``, ``documents``, ``contexts``, ``store_docs``, ``steering`` and the ``vocab`` that decodes every
    token id in them.
    """
    unembed = tuned.unembed if tuned is not None else Unembed.from_parts(loaded.parts)
    lenses: dict[str, Lens] = {"logit": LogitLens(unembed)} | ({"tuned": tuned} if tuned is not None else {})
    layers = atlas_layers(settings.layers, store)
    docs = store.docs()
    sampled = sample_documents(docs, settings.split, settings.docs_per_label, settings.seed)
    log(f"{sampled.height} documents of split {settings.split!r} at layers {layers}")
    documents, scales, contexts = document_payloads(store, sampled, lenses, unembed, layers, settings, log)
    referenced = sorted({context[0] for context in contexts.values()} | set(sampled["doc"].to_list()))
    store_docs = {str(i): [docs["doc_id"][i], docs["label"][i], docs["split"][i]] for i in referenced}
    decode = functools.partial(loaded.tokenizer.decode, clean_up_tokenization_spaces=False)
    meta = {
        "model": store.attrs["model"],
        "corpus": store.attrs["corpus"],
        "split": settings.split,
        "layers": layers,
        "n_layers": int(store.attrs["n_layers"]),
        "lenses": list(lenses),
        "lens_layers": {name: [layer for layer in layers if lens.reads(layer)] for name, lens in lenses.items()},
        "top_k": settings.top_k,
        "typical_norm": [round(scales[layer], 4) for layer in layers],
        "massive_multiple": settings.massive_multiple,
        "neighbours": {
            "k": settings.neighbours_k,
            "metric": settings.metric,
            "standardised": settings.standardise,
            "skip_first_position": settings.skip_first_position,
            "stored_rows": store.n_tokens,
        },
        "max_tokens": settings.max_tokens,
        "documents_sampled": sampled.height,
    }
    return {
        "meta": meta,
        "documents": documents,
        "contexts": {str(row): context for row, context in contexts.items()},
        "store_docs": store_docs,
        "steering": steering_runs(steering),
        "vocab": vocabulary(sorted(used_ids(documents, contexts)), decode),
    }
