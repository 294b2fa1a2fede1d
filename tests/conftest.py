"""Shared fixtures: tiny random models (built in milliseconds) and a small corpus."""

from pathlib import Path

import polars as pl
import pytest

from latent_atlas.models import acquire_model, load_model
from latent_atlas.testing import TINY_ARCHITECTURES, save_tiny_model

REPO = Path(__file__).resolve().parents[1]

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
