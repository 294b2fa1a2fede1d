"""Sharded extraction: the gathered store is the unsharded store, bit for bit; bad shards are refused."""

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from latent_atlas.errors import StoreError
from latent_atlas.extract import ExtractionSettings, extract_activations, plan_extraction
from latent_atlas.shards import (
    batch_costs,
    extract_shard,
    gather_shards,
    plan_fingerprint,
    plan_shards,
    shard_plan,
    split_batches,
)
from latent_atlas.store import ActivationStore
from tests.conftest import STORE_ATTRS

REPO = Path(__file__).resolve().parents[2]
# 8 documents, at most 2 per batch: 4 batches
SETTINGS = {"dtype": "float32", "max_length": 64, "batch_size": 2, "max_batch_tokens": 64, "device": "cpu"}
# another store: float16, compressed, a sample of the positions, some layers, one split
SAMPLED = {**SETTINGS, "dtype": "float16", "compression": "gzip", "token_fraction": 0.6, "seed": 5, "layers": [0, 2]}
GATHER_ONLY_ATTRS = {"shards", "shard_provenance"}


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    from latent_atlas.models import load_model

    return load_model(tiny_model_dirs["llama"], device="cpu")


def _settings(**overrides) -> ExtractionSettings:
    return ExtractionSettings(**{**SETTINGS, **overrides})


def _unsharded(loaded, corpus, path, settings):
    return extract_activations(loaded, corpus, path, settings, STORE_ATTRS, progress=False)


def _shards(loaded, corpus, folder, n_shards, settings):
    return [
        extract_shard(loaded, corpus, folder / f"{k}.h5", settings, STORE_ATTRS, k, n_shards, progress=False)
        for k in range(n_shards)
    ]


def _datasets(file: h5py.File) -> dict[str, h5py.Dataset]:
    found = {}
    file.visititems(lambda name, item: found.update({name: item}) if isinstance(item, h5py.Dataset) else None)
    return found


def assert_same_store(unsharded: Path, gathered: Path, n_shards: int) -> None:
    """Every dataset (values, dtype, shape, chunks, compression) and every attribute but `created` agree."""
    with h5py.File(unsharded, "r") as a, h5py.File(gathered, "r") as b:
        want, have = _datasets(a), _datasets(b)
        assert sorted(want) == sorted(have)
        for name, expected in want.items():
            got = have[name]
            assert (got.dtype, got.shape, got.chunks, got.compression) == (
                expected.dtype,
                expected.shape,
                expected.chunks,
                expected.compression,
            ), name
            if expected.dtype.kind == "O":
                assert got.asstr()[...].tolist() == expected.asstr()[...].tolist(), name
            else:
                np.testing.assert_array_equal(got[...], expected[...], err_msg=name)
        assert set(b.attrs) - set(a.attrs) == GATHER_ONLY_ATTRS
        for key in set(a.attrs) - {"created"}:
            expected, got = a.attrs[key], b.attrs[key]
            assert type(got) is type(expected), key
            assert np.asarray(got).dtype == np.asarray(expected).dtype, key
            assert np.array_equal(np.asarray(got), np.asarray(expected)), key
        assert b.attrs["shards"] == n_shards
    with ActivationStore(unsharded) as a, ActivationStore(gathered) as b:  # and readers see the same store
        assert a.docs().equals(b.docs())
        assert a.tokens().equals(b.tokens())
        for address in a.addresses:
            np.testing.assert_array_equal(a.read(address), b.read(address))


@pytest.fixture(scope="module")
def reference(loaded, tmp_path_factory):
    from tests.conftest import SENTENCES

    corpus = _corpus(SENTENCES)
    root = tmp_path_factory.mktemp("reference")
    return corpus, _unsharded(loaded, corpus, root / "full.h5", _settings())


def _corpus(sentences):
    import polars as pl

    n = len(sentences)
    return pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n)],
            "text": sentences,
            "label": ["a" if i % 2 else None for i in range(n)],
            "split": ["heldout" if i % 4 == 3 else "train" for i in range(n)],
            "source": ["test"] * n,
        }
    )


# ---- the split ------------------------------------------------------------------------------------------


def test_the_plan_has_several_batches(loaded, reference):
    corpus, _ = reference
    plan = plan_extraction(loaded.tokenizer, corpus["text"].to_list(), _settings())
    assert len(plan.batches) == 4


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 5, 7, 20])
def test_split_is_contiguous_non_empty_balanced_and_deterministic(n_shards):
    rng = np.random.default_rng(n_shards)
    costs = rng.integers(1, 100, size=12).tolist()
    split = split_batches(costs, n_shards)
    assert split == split_batches(list(costs), n_shards)
    assert len(split) == n_shards
    assert [b for part in split for b in part] == list(range(len(costs)))
    if n_shards <= len(costs):
        assert all(len(part) for part in split)
        # each boundary is within one batch of its ideal place
        before = np.concatenate([[0], np.cumsum(costs)])
        for k, part in enumerate(split[1:], start=1):
            ideal = before[-1] * k / n_shards
            assert abs(before[part.start] - ideal) <= max(costs) or 1 in (len(split[k - 1]), len(part))
    else:
        assert [len(part) for part in split] == [1] * len(costs) + [0] * (n_shards - len(costs))


def test_split_balances_cost_not_batch_count():
    # one dear batch then many cheap ones: two shards split the cost, not the count
    assert split_batches([100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10], 2) == [range(0, 1), range(1, 11)]
    assert split_batches([5, 5, 5, 5], 2) == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match="at least 1"):
        split_batches([1, 2], 0)


@pytest.mark.parametrize("n_shards", [1, 2, 3, 6])
def test_shards_tile_the_plan_in_store_order(loaded, reference, n_shards):
    corpus, _ = reference
    plan = plan_extraction(loaded.tokenizer, corpus["text"].to_list(), _settings())
    again = plan_extraction(loaded.tokenizer, corpus["text"].to_list(), _settings())
    assert plan_fingerprint(plan) == plan_fingerprint(again)
    assert plan_shards(plan, n_shards) == plan_shards(again, n_shards)
    shards = plan_shards(plan, n_shards)
    assert [d for s in shards for d in s.docs] == list(range(len(plan.doc_index)))
    assert [r for s in shards for r in s.rows] == list(range(plan.n_rows))
    for shard in shards:
        local = shard_plan(plan, shard)
        assert local.n_rows == len(shard.rows)
        assert [i for batch in local.batches for i in batch] == list(range(len(shard.docs)))
        if len(shard.docs):
            assert local.row_start[0] == 0
    assert sum(batch_costs(plan)) > 0


def test_the_fingerprint_sees_the_token_sample(loaded, reference):
    corpus, _ = reference
    texts = corpus["text"].to_list()
    one = plan_extraction(loaded.tokenizer, texts, _settings(token_fraction=0.5, seed=1))
    two = plan_extraction(loaded.tokenizer, texts, _settings(token_fraction=0.5, seed=2))
    assert plan_fingerprint(one) != plan_fingerprint(two)


# ---- gathered == unsharded ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 6])
def test_gathered_store_is_the_unsharded_store(loaded, reference, tmp_path, n_shards):
    corpus, full = reference
    paths = _shards(loaded, corpus, tmp_path / "shards", n_shards, _settings())
    sizes = []
    for path in paths:
        with ActivationStore(path) as shard:  # each shard is a valid store of its own
            sizes.append(shard.n_tokens)
    if n_shards > 4:
        assert sizes[4:] == [0] * (n_shards - 4)  # more shards than batches: the last ones are empty
    # tiny blocks: several blocks per shard and address
    gathered = gather_shards(paths, tmp_path / "store.h5", expect=STORE_ATTRS, block_bytes=200)
    assert_same_store(full, gathered, n_shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "store.h5"]  # no temporary left


def test_sampled_compressed_float16_store_gathers_identically(loaded, reference, tmp_path):
    corpus, _ = reference
    settings = ExtractionSettings(**SAMPLED)
    full = _unsharded(loaded, corpus, tmp_path / "full.h5", settings)
    paths = _shards(loaded, corpus, tmp_path / "shards", 3, settings)
    gathered = gather_shards(paths, tmp_path / "store.h5", block_bytes=1 << 20)
    assert_same_store(full, gathered, 3)
    with ActivationStore(gathered) as store:
        assert store.layers == [0, 2]


# ---- refusals -------------------------------------------------------------------------------------------


@pytest.fixture
def two_shards(loaded, reference, tmp_path):
    corpus, _ = reference
    return _shards(loaded, corpus, tmp_path / "shards", 2, _settings())


def _refused(paths, target, match, expect=None):
    with pytest.raises(StoreError, match=match):
        gather_shards(paths, target, expect=expect)
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


def test_a_truncated_shard_is_refused(two_shards, tmp_path):
    data = two_shards[1].read_bytes()
    two_shards[1].write_bytes(data[: len(data) // 2])
    _refused(two_shards, tmp_path / "store.h5", r"shard 1 of 2 .*1\.h5.*truncated or not an HDF5 file.*snakemake")


def test_an_incomplete_shard_is_refused(two_shards, tmp_path):
    with h5py.File(two_shards[0], "r+") as file:
        file.attrs["complete"] = False
    _refused(two_shards, tmp_path / "store.h5", r"shard 0 of 2 .*0\.h5.*incomplete")


def test_a_missing_shard_is_refused(two_shards, tmp_path):
    two_shards[1].unlink()
    _refused(two_shards, tmp_path / "store.h5", r"shard 1 of 2 .*does not exist.*snakemake .*store\.h5")


def test_shards_out_of_order_are_refused(two_shards, tmp_path):
    _refused(two_shards[::-1], tmp_path / "store.h5", r"shard 0 of 2 .*1\.h5.* holds shard 1 of 2")


def test_stale_shards_of_another_count_are_refused(loaded, reference, two_shards, tmp_path):
    corpus, _ = reference
    three = _shards(loaded, corpus, tmp_path / "three", 3, _settings())
    _refused([three[0], two_shards[1]], tmp_path / "store.h5", r"holds shard 0 of 3: it is stale")
    _refused(three[:2], tmp_path / "store.h5", r"shard 0 of 2 .* holds shard 0 of 3")


def test_shards_of_different_settings_are_refused(loaded, reference, two_shards, tmp_path):
    corpus, _ = reference
    other = _shards(loaded, corpus, tmp_path / "other", 2, _settings(token_fraction=0.5))
    _refused([two_shards[0], other[1]], tmp_path / "store.h5", r"shard 1 of 2 .* differs from shard 0 .*extraction")


def test_a_shard_for_another_config_is_refused(two_shards, tmp_path):
    expect = {**STORE_ATTRS, "config_hash": "elsewhere"}
    _refused(two_shards, tmp_path / "store.h5", r"shard 0 of 2 .*config_hash: store has 'test'", expect)


def test_a_plain_store_is_not_a_shard(reference, two_shards, tmp_path):
    _, full = reference
    shutil.copy(full, tmp_path / "plain.h5")
    _refused([two_shards[0], tmp_path / "plain.h5"], tmp_path / "store.h5", r"shard 1 of 2 .* is not a shard")


# ---- the workflow ---------------------------------------------------------------------------------------


def test_the_scripts_scatter_and_gather(loaded, reference, tiny_model_dirs, tmp_path, monkeypatch):
    """scripts/extract_shard.py and scripts/gather_shards.py, run as the rules run them."""
    import contextlib
    import logging
    import runpy
    from types import SimpleNamespace

    import latent_atlas.joblog
    from latent_atlas.corpus import write_corpus

    @contextlib.contextmanager
    def quiet_log(_path):  # the real job_log re-configures the root logger of the whole test process
        yield logging.getLogger("latent_atlas")

    monkeypatch.setattr(latent_atlas.joblog, "job_log", quiet_log)
    corpus, full = reference
    corpus_path = tmp_path / "corpus.parquet"
    write_corpus(corpus, corpus_path, {"format": "test"})
    provenance = {"model": "tiny", "corpus": "c", "config_hash": "h"}
    shards = [tmp_path / f"c.shards/{k}.h5" for k in range(2)]
    for k, shard in enumerate(shards):
        snakemake = SimpleNamespace(
            log=[str(tmp_path / f"{k}.log")],
            threads=1,
            wildcards=SimpleNamespace(shard=str(k)),
            input=SimpleNamespace(manifest=str(tiny_model_dirs["llama"] / "manifest.json"), corpus=str(corpus_path)),
            output=SimpleNamespace(store=str(shard)),
            params=SimpleNamespace(settings={**SETTINGS, "shards": 2}, model={}, provenance=provenance, shards=2),
        )
        runpy.run_path(str(REPO / "scripts" / "extract_shard.py"), init_globals={"snakemake": snakemake})
    snakemake = SimpleNamespace(
        log=[str(tmp_path / "gather.log")],
        input=SimpleNamespace(shards=[str(s) for s in shards]),
        output=SimpleNamespace(store=str(tmp_path / "c.h5")),
        params=SimpleNamespace(provenance=provenance),
    )
    runpy.run_path(str(REPO / "scripts" / "gather_shards.py"), init_globals={"snakemake": snakemake})
    with ActivationStore(tmp_path / "c.h5", expect=provenance) as store, ActivationStore(full) as reference_store:
        assert store.attrs["shards"] == 2
        for address in store.addresses:
            np.testing.assert_array_equal(store.read(address), reference_store.read(address))


@pytest.mark.slow
def test_dry_run_scatters_and_gathers(tmp_path):
    """With extraction.shards: 3 the DAG extracts 3 shards per store and gathers them; no extract_activations."""
    root = tmp_path / "work"
    root.mkdir()
    (root / "config").symlink_to(REPO / "config")
    overlay = root / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"paths": {"resources": str(REPO / "resources")}, "extraction": {"shards": 3}}))
    command = [sys.executable, "-m", "snakemake", "--dry-run", "--snakefile", str(REPO / "workflow/Snakefile")]
    command += ["--directory", str(root), "--configfile", "config/config.yaml", str(overlay)]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rule extract_activations:" not in output
    assert "rule extract_shard:" in output and "rule gather_shards:" in output
    assert "results/activations/smollm2-135m/registers.shards/2.h5" in output
    assert "results/activations/smollm2-135m/registers.shards/3.h5" not in output
