"""What the neighbourhood rules call: explore around a point, walk a path, list a point's data neighbours.

Tables are long: one row per (state, decoder). Every state also carries where it lies relative to real
data: its Euclidean distance to the nearest stored state at the same address, that state's row and the
text around its token. A point's table also holds its ``data`` rows (the stored states nearest to it,
which define the ``local_pca`` family) and 2-D PCA coordinates of everything, for the scatter figure.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import polars as pl
import torch

from latent_atlas.addresses import resid_address
from latent_atlas.config import probe_layer
from latent_atlas.errors import ConfigError
from latent_atlas.lenses.base import Lens
from latent_atlas.lenses.probe import probe_vector
from latent_atlas.models import LoadedModel
from latent_atlas.neighbourhood.decode import MODEL_DECODER, Context, decode_against_reference
from latent_atlas.neighbourhood.knn import (
    DEFAULT_BLOCK_ROWS,
    METRICS,
    LayerStatistics,
    layer_statistics,
    nearest_stored,
    token_contexts,
)
from latent_atlas.neighbourhood.sampling import FAMILIES, INTERPOLATIONS, family_bases, interpolate, path_positions
from latent_atlas.neighbourhood.sampling import sample_around as sample_states
from latent_atlas.store import ActivationStore


@dataclass(frozen=True)
class NeighbourhoodSettings:
    """The ``neighbourhood`` config section (see workflow/schemas/config.schema.yaml)."""

    radii: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    families: tuple[str, ...] = FAMILIES
    samples: int = 16
    model_samples: int = 4
    local_k: int = 64
    local_components: int = 8
    rogue_dimensions: int = 3
    path_steps: int = 10
    path_extrapolation: int = 5
    neighbours_k: int = 10
    context_tokens: int = 8
    top_k: int = 10
    decoders: tuple[str, ...] = ("logit", "tuned", "semantic_basis", MODEL_DECODER)
    layers: tuple[int, ...] | None = None
    block_rows: int = DEFAULT_BLOCK_ROWS
    skip_first_position: bool = True
    steered_states: int | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "NeighbourhoodSettings":
        """Build from a config section, ignoring keys that name points and paths."""
        known = {field.name for field in fields(cls)}
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in section.items()}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass(frozen=True)
class _Layer:
    """One layer of one store: its statistics and the nearest-stored-state lookups at it."""

    store: ActivationStore
    layer: int
    statistics: LayerStatistics
    settings: NeighbourhoodSettings

    @classmethod
    def open(cls, store: ActivationStore, layer: int, settings: NeighbourhoodSettings) -> "_Layer":
        if layer not in store.layers:
            raise ConfigError(
                f"{resid_address(layer)} is not stored in {store.path} (stored layers: {store.layers}); "
                "add the layer to extraction.layers or choose neighbourhood.layers among the stored ones"
            )
        statistics = layer_statistics(store, layer, settings.skip_first_position, settings.block_rows)
        return cls(store, layer, statistics, settings)

    def nearest(self, queries: np.ndarray, k: int, metric: str = "euclidean", standardise: bool = False) -> Any:
        return nearest_stored(
            self.store,
            self.layer,
            queries,
            k,
            metric,  # type: ignore[arg-type]
            self.statistics if standardise else None,
            self.settings.skip_first_position,
            self.settings.block_rows,
        )

    def data_position(self, states: np.ndarray, decode: Any, own_rows: np.ndarray | None = None) -> dict[str, Any]:
        """Distance (relative to the typical norm) to, row of and context around each state's nearest stored state.

        ``own_rows[i] >= 0`` says state i is that stored row: its nearest *other* stored state is reported
        (the local spacing of the data).
        """
        found = self.nearest(states, 2)
        own = np.full(len(states), -1) if own_rows is None else own_rows
        column = (found.rows[:, 0] == own).astype(np.int64)
        rows = np.take_along_axis(found.rows, column[:, None], 1)[:, 0]
        distances = np.take_along_axis(found.scores, column[:, None], 1)[:, 0]
        unique = np.unique(rows)
        texts = token_contexts(self.store, decode, unique, self.settings.context_tokens)
        contexts = dict(zip(unique.tolist(), texts, strict=True))
        return {
            "nn_row": rows,
            "nn_distance": distances / self.statistics.typical_norm,
            "nn_context": [contexts[int(row)] for row in rows],
        }


def _decoders(
    loaded: LoadedModel, lenses: Mapping[str, Lens], names: Sequence[str], layer: int
) -> dict[str, Lens | LoadedModel]:
    """The configured decoders that can read ``layer`` (a lens that cannot is left out)."""
    unknown = [name for name in names if name != MODEL_DECODER and name not in lenses]
    if unknown:
        raise ConfigError(
            f"config key 'neighbourhood.decoders': unknown decoders {unknown}; use {MODEL_DECODER} or one of "
            f"{', '.join(lenses)}"
        )
    return {
        name: loaded if name == MODEL_DECODER else lenses[name]
        for name in names
        if name == MODEL_DECODER or lenses[name].reads(layer)
    }


def _decoded_rows(
    loaded: LoadedModel,
    decoders: Mapping[str, Lens | LoadedModel],
    reference: torch.Tensor,
    states: np.ndarray,
    layer: int,
    k: int,
    context: Context,
    model_subset: np.ndarray,
) -> pl.DataFrame:
    """Long table of every decoder's metrics; the model decodes only the ``model_subset`` rows."""
    tables = []
    for name, decoder in decoders.items():
        rows = model_subset if name == MODEL_DECODER else np.arange(len(states))
        metrics = decode_against_reference(
            decoder, reference, torch.from_numpy(states[rows]), layer, k, context, loaded.device
        )
        tables.append(pl.DataFrame({"state": rows, "decoder": name, **metrics}))
    table = pl.concat(tables)
    tokens = {i: loaded.tokenizer.decode([i]) for i in table["top1_id"].unique().to_list()}
    return table.with_columns(top1_token=pl.col("top1_id").replace_strict(tokens, return_dtype=pl.String))


def _pca_coordinates(states: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """2-D PCA coordinates ``(n, 2)`` of states, centred on their mean, signs fixed (largest loading positive)."""
    centred = states.astype(np.float64) - states.mean(0, dtype=np.float64)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2] * np.sign(vt[:2][np.arange(min(2, len(vt))), np.abs(vt[:2]).argmax(1)])[:, None]
    coordinates = (states.astype(np.float64) - origin) @ axes.T
    return np.pad(coordinates, ((0, 0), (0, 2 - coordinates.shape[1])))


def _point_context(loaded: LoadedModel, name: str, probes: Mapping[str, Mapping[str, Any]]) -> Context:
    """A text probe's own text and position; the identity prompt for midpoints and saved vectors."""
    spec = probes[name]
    if "text" in spec:
        return Context(spec["text"], int(spec.get("position", -1)))
    return Context.identity(loaded.tokenizer)


def explore_point(
    loaded: LoadedModel,
    store: ActivationStore,
    point: str,
    probes: Mapping[str, Mapping[str, Any]],
    lenses: Mapping[str, Lens],
    settings: NeighbourhoodSettings,
) -> pl.DataFrame:
    """Sample around a probe at each configured layer, decode every sample and place it relative to the data."""
    layers = settings.layers or [probe_layer(probes, point)]
    return pl.concat([_explore_layer(loaded, store, point, probes, lenses, settings, layer) for layer in layers])


def _explore_layer(
    loaded: LoadedModel,
    store: ActivationStore,
    point: str,
    probes: Mapping[str, Mapping[str, Any]],
    lenses: Mapping[str, Lens],
    settings: NeighbourhoodSettings,
    layer: int,
) -> pl.DataFrame:
    centre, layer = probe_vector(loaded, point, probes, layer)
    at = _Layer.open(store, layer, settings)
    centre_np = centre.cpu().numpy()
    local_rows = np.sort(at.nearest(centre_np, settings.local_k).rows[0])
    local_states = store.read(layer, local_rows)
    bases = family_bases(
        at.statistics, local_states, settings.families, settings.local_components, settings.rogue_dimensions
    )
    samples = sample_states(
        centre_np, bases, settings.radii, settings.samples, at.statistics.typical_norm, settings.seed, point
    )
    states = np.concatenate([centre_np[None], samples.vectors, local_states])
    n_samples, n_data = len(samples.vectors), len(local_states)
    kind = ["centre"] + ["sample"] * n_samples + ["data"] * n_data
    model_subset = np.flatnonzero(
        np.concatenate([[True], samples.index < settings.model_samples, np.zeros(n_data, bool)])
    )
    decoded = _decoded_rows(
        loaded,
        _decoders(loaded, lenses, settings.decoders, layer),
        centre,
        states,
        layer,
        settings.top_k,
        _point_context(loaded, point, probes),
        model_subset,
    )
    pca = _pca_coordinates(states, centre_np)
    data_rows = np.concatenate([[-1], -np.ones(n_samples, np.int64), local_rows])
    typical = at.statistics.typical_norm
    described = pl.DataFrame(
        {
            "state": np.arange(len(states)),
            "kind": kind,
            "family": ["centre", *samples.family, *["data"] * n_data],
            "radius": np.concatenate(
                [[0.0], samples.radius, np.linalg.norm(local_states - centre_np, axis=1) / typical]
            ),
            "sample": np.concatenate([[0], samples.index, np.arange(n_data)]),
            "norm": np.linalg.norm(states, axis=1) / typical,
            "pca1": pca[:, 0],
            "pca2": pca[:, 1],
            "data_row": data_rows,
            **at.data_position(states, loaded.tokenizer.decode, data_rows),
        }
    )
    return _finish(decoded.join(described, on="state"), point, layer, typical, settings, store)


def explore_path(
    loaded: LoadedModel,
    store: ActivationStore,
    path: str,
    endpoints: Sequence[str],
    probes: Mapping[str, Mapping[str, Any]],
    lenses: Mapping[str, Lens],
    settings: NeighbourhoodSettings,
) -> pl.DataFrame:
    """Interpolate (linear and slerp) and extrapolate between two probes; decode every step."""
    start_name, end_name = endpoints
    layers = settings.layers or [probe_layer(probes, start_name)]
    tables = []
    t = path_positions(settings.path_steps, settings.path_extrapolation)
    for layer in layers:
        (start, layer_a), (end, layer_b) = (probe_vector(loaded, name, probes, layer) for name in endpoints)
        if layer_a != layer_b:
            raise ConfigError(
                f"config key 'neighbourhood.paths.{path}' joins probes at layers {layer_a} and {layer_b}; "
                "give both the same layer or set neighbourhood.layers"
            )
        at = _Layer.open(store, layer, settings)
        states = np.concatenate([interpolate(start.cpu().numpy(), end.cpu().numpy(), t, how) for how in INTERPOLATIONS])
        decoders = _decoders(loaded, lenses, settings.decoders, layer)
        everything = np.arange(len(states))
        args = (layer, settings.top_k, Context.identity(loaded.tokenizer), everything)
        from_start = _decoded_rows(loaded, decoders, start, states, *args)
        from_end = _decoded_rows(loaded, decoders, end, states, *args).select(
            "state", "decoder", kl_to_end="kl_to_reference", top1_is_end="top1_retained"
        )
        typical = at.statistics.typical_norm
        described = pl.DataFrame(
            {
                "state": everything,
                "kind": "path",
                "family": np.repeat(INTERPOLATIONS, len(t)),
                "t": np.tile(t, len(INTERPOLATIONS)),
                "norm": np.linalg.norm(states, axis=1) / typical,
                **at.data_position(states, loaded.tokenizer.decode),
            }
        )
        table = from_start.join(from_end, on=["state", "decoder"]).join(described, on="state")
        tables.append(
            _finish(
                table.with_columns(start=pl.lit(start_name), end=pl.lit(end_name)),
                path,
                layer,
                typical,
                settings,
                store,
            )
        )
    return pl.concat(tables)


def _finish(
    table: pl.DataFrame,
    point: str,
    layer: int,
    typical_norm: float,
    settings: NeighbourhoodSettings,
    store: ActivationStore,
) -> pl.DataFrame:
    """Add the identifying columns and put them first."""
    attrs = store.attrs
    identity = {
        "model": attrs["model"],
        "corpus": attrs["corpus"],
        "point": point,
        "address": resid_address(layer),
        "layer": layer,
        "typical_norm": typical_norm,
        "seed": settings.seed,
    }
    table = table.with_columns(**{key: pl.lit(value) for key, value in identity.items()})
    return table.select(*identity, *[c for c in table.columns if c not in identity]).sort("state", "decoder")


def data_neighbours(
    store: ActivationStore,
    decode: Any,
    vector: np.ndarray,
    layer: int,
    settings: NeighbourhoodSettings,
) -> pl.DataFrame:
    """The exact k nearest stored states of one vector, by cosine and Euclidean, raw and standardised.

    One row per (metric, standardised, rank): store row, score, the document and the text around the token.
    """
    at = _Layer.open(store, layer, settings)
    tokens, docs = store.tokens(), store.docs()
    tables = []
    for metric in METRICS:
        for standardise in (False, True):
            found = at.nearest(vector, settings.neighbours_k, metric, standardise)
            rows = found.rows[0]
            doc = tokens["doc"].to_numpy()[rows]
            tables.append(
                pl.DataFrame(
                    {
                        "metric": metric,
                        "standardised": standardise,
                        "rank": np.arange(1, len(rows) + 1),
                        "row": rows,
                        "score": found.scores[0],
                        "doc_id": docs["doc_id"].to_numpy()[doc],
                        "label": docs["label"].to_numpy()[doc],
                        "pos": tokens["pos"].to_numpy()[rows],
                        "token": [decode([int(i)]) for i in tokens["token_id"].to_numpy()[rows]],
                        "context": token_contexts(store, decode, rows, settings.context_tokens),
                    }
                )
            )
    return pl.concat(tables).with_columns(address=pl.lit(resid_address(layer)), layer=pl.lit(layer))


def point_vectors(
    loaded: LoadedModel, point: str, probes: Mapping[str, Mapping[str, Any]], settings: NeighbourhoodSettings
) -> list[tuple[np.ndarray, int]]:
    """The probe's state at each layer the neighbourhood section reads it (its own layer by default)."""
    layers = settings.layers or [None]
    resolved = [probe_vector(loaded, point, probes, layer) for layer in layers]
    return [(vector.cpu().numpy(), layer) for vector, layer in resolved]


def neighbours_of_point(
    loaded: LoadedModel,
    store: ActivationStore,
    point: str,
    probes: Mapping[str, Mapping[str, Any]],
    settings: NeighbourhoodSettings,
) -> pl.DataFrame:
    """:func:`data_neighbours` of a probe at each of its layers."""
    tables = [
        data_neighbours(store, loaded.tokenizer.decode, vector, layer, settings)
        for vector, layer in point_vectors(loaded, point, probes, settings)
    ]
    return pl.concat(tables).with_columns(point=pl.lit(point))


def open_store(path: str | os.PathLike[str], loaded: LoadedModel) -> ActivationStore:
    """Open a store, checking it was made from this model."""
    return ActivationStore(path, expect={"model_sha256": loaded.manifest["weights_sha256"]})
