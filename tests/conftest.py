"""Shared fixtures: tiny random models (built in milliseconds) and a small corpus."""

import contextlib
from pathlib import Path

import polars as pl
import pytest

from latent_atlas.models import acquire_model, load_model
from latent_atlas.testing import TINY_ARCHITECTURES, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Apply pyproject's temporary-directory retention when the session starts, not only when it ends.

    pytest removes earlier sessions' directories at the end of a session; on a machine that kept several (each
    end-to-end run writes ~2 GB), this session's end-to-end runs would meet a full disk before that. Directories
    locked by a session still running are left alone. Uses pytest's own cleanup, and does nothing where its
    internals differ or ``--basetemp`` names the directory.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from _pytest.pathlib import LOCK_TIMEOUT, cleanup_numbered_dir

        factory = session.config._tmp_path_factory
        if factory._given_basetemp is None:
            basetemp = factory.getbasetemp()
            cleanup_numbered_dir(
                root=basetemp.parent,
                prefix="pytest-",
                keep=max(factory._retention_count, 1),
                consider_lock_dead_if_created_before=basetemp.stat().st_mtime - LOCK_TIMEOUT,
            )


SENTENCES = [
    "the dog saw the cat and the cat saw the dog .",
    "a small red house was by the river .",
    "people said the world was old , but the city was new .",
    "one day the light came .",
    "two dogs and three cats went to the house at night !",
    "the water was blue .",
    "is it a time of sound or of light ?",
    "they had made the way for people .",
]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One acquired model directory (with manifest) per tiny architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for arch in TINY_ARCHITECTURES:
        source = save_tiny_model(root / f"source-{arch}", arch, n_layers=3)
        dirs[arch] = root / arch
        acquire_model(f"tiny-{arch}", {"source": "local", "path": str(source)}, dirs[arch], root / "downloads")
    return dirs


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_loaded(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]):
    """A loaded tiny model of each architecture, on the CPU."""
    return load_model(tiny_model_dirs[request.param], device="cpu")


@pytest.fixture
def tiny_corpus() -> pl.DataFrame:
    """A documents table of eight short sentences in two labels and both splits."""
    n = len(SENTENCES)
    return pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n)],
            "text": SENTENCES,
            "label": ["a" if i % 2 else "b" for i in range(n)],
            "split": ["heldout" if i % 4 == 3 else "train" for i in range(n)],
            "source": ["test"] * n,
        }
    )


STORE_ATTRS = {"model": "tiny", "corpus": "tiny-corpus", "corpus_sha256": "0" * 64, "config_hash": "test"}


def untied_llama(root: Path, seed: int, intermediate_size: int, layers: int):
    """A tiny Llama with its own LM head (``tie_word_embeddings=False``), acquired and loaded like any model.

    Its matrices are drawn at a trained scale (std 0.3), so that top-k lists are far from ties.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from latent_atlas.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
    model.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    acquire_model("untied", {"source": "local", "path": str(root / "source")}, root / "model", root / "dl")
    loaded = load_model(root / "model", device="cpu")
    assert not torch.equal(loaded.parts.lm_head.weight, loaded.parts.embed.weight)
    return loaded


def reference_states(loaded, ids):
    """transformers' own states of every residual layer (the raw last-block output by a hook) and logits.

    Returns ``(states, logits)``: ``states[l]`` is ``(T, d)`` for l = 0..L, ``logits`` is ``(T, V)``.
    """
    import torch

    captured = {}
    handle = loaded.parts.layers[-1].register_forward_hook(
        lambda module, args, output: captured.update(raw=output[0] if isinstance(output, tuple) else output)
    )
    with torch.no_grad():
        out = loaded.model(input_ids=ids[None], output_hidden_states=True)
    handle.remove()
    states = [out.hidden_states[layer][0] for layer in range(loaded.n_layers)] + [captured["raw"][0]]
    return states, out.logits[0]
