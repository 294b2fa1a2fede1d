"""Train one member of a family and save it as a standard model directory with a manifest.

The directory holds what :func:`latent_atlas.models.acquire_model` writes for a downloaded model
(``config.json``, safetensors, tokenizer, ``manifest.json``), so extraction, lenses and geometry read a
member exactly as they read SmolLM2. Its manifest adds the training record: family, mixture, recipe and
data hashes, tokens seen per register, epochs per register, seed, final validation loss and the training
corpus's sha256.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import torch

from latent_atlas.models import MANIFEST, describe_model, resolve_device
from latent_atlas.provenance import atomic_output, write_json, write_parquet_with_provenance
from latent_atlas.training.data import load_streams, pack_member
from latent_atlas.training.loop import Recipe, TrainingResult, build_model, recipe_record, train


def fingerprint(spec: Mapping[str, Any]) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the member's recipe and data hashes."""
    return {"recipe_hash": spec["recipe_hash"], "data_hash": spec["data_hash"]}


def train_member(
    spec: Mapping[str, Any],
    recipe: Recipe,
    tokenizer_dir: str | Path,
    streams_path: str | Path,
    corpus_sha256: str,
    model_dir: str | Path,
    losses_path: str | Path,
    checkpoint_dir: str | Path,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the member ``spec`` (see :func:`latent_atlas.training.family.member_spec`); return its manifest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = pack_member(
        load_streams(streams_path),
        spec["mixture"],
        recipe.train_sequences,
        recipe.validation_sequences,
        recipe.architecture.sequence_length,
        recipe.seed,
    )
    model = build_model(recipe.architecture, tokenizer, recipe.seed)
    result = train(
        model,
        data.train,
        data.validation,
        recipe,
        checkpoint_dir,
        fingerprint(spec),
        device=resolve_device(device, "training.device"),
        progress=progress,
    )
    training = {
        "family": spec["family"],
        "mixture": dict(spec["mixture"]),
        "recipe": recipe_record(recipe),
        "recipe_hash": spec["recipe_hash"],
        "data_hash": spec["data_hash"],
        "training_corpus_sha256": corpus_sha256,
        "tokens_seen": result.tokens_seen,
        "tokens_per_register": {r: n * recipe.architecture.sequence_length for r, n in data.train_sequences.items()},
        "epochs_per_register": data.epochs,
        "seed": recipe.seed,
        "final_validation_loss": result.final_validation_loss,
        "resumed_from_step": result.resumed_from,
    }
    manifest = save_member(result, tokenizer, spec, training, model_dir)
    write_parquet_with_provenance(
        result.losses.select(pl.lit(spec["name"]).alias("model"), pl.all()),
        losses_path,
        {"member": spec["name"], **training, "weights_sha256": manifest["weights_sha256"]},
    )
    return manifest


def save_member(
    result: TrainingResult, tokenizer: Any, spec: Mapping[str, Any], training: Mapping[str, Any], model_dir: str | Path
) -> dict[str, Any]:
    """Write the member as a float32 HF directory with ``manifest.json``, atomically."""
    with atomic_output(model_dir) as tmp:
        model = result.model.to(torch.device("cpu"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        origin = {"training": dict(training)}
        manifest = describe_model(spec["name"], spec, model, tmp, origin, "float32")
        write_json(tmp / MANIFEST, manifest)
    return manifest
