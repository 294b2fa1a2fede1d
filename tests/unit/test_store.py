"""The activation store: round trip, reads, and clear errors for every kind of bad file."""

from types import SimpleNamespace

import h5py
import numpy as np
import polars as pl
import pytest

from latent_atlas.errors import DiskSpaceError, StoreError
from latent_atlas.store import ActivationStore, StoreWriter, chunk_rows

D = 8
LAYERS = [0, 2, 4]


def _write(path, n_tokens=10, dtype="float32", fail_after_states=False):
    rng = np.random.default_rng(0)
    states = {f"resid.{layer:02d}": rng.normal(size=(n_tokens, D)).astype(np.float32) for layer in LAYERS}
    states["ln_final"] = rng.normal(size=(n_tokens, D)).astype(np.float32)
    docs = pl.DataFrame(
        {
            "doc_id": ["x", "y"],
            "label": ["a", None],
            "split": ["train", "heldout"],
            "token_start": [0, 6],
            "token_count": [6, n_tokens - 6],
        }
    )
    attrs = {
        "model": "m",
        "model_sha256": "f" * 64,
        "corpus": "c",
        "corpus_sha256": "e" * 64,
        "config_hash": "h",
        "code_version": "v",
        "n_layers": 4,
        "created": "now",
    }
    with StoreWriter(path, n_tokens, D, LAYERS, dtype, attrs) as writer:
        writer.write_tokens(
            np.arange(n_tokens) + 100,
            np.r_[np.zeros(6), np.ones(n_tokens - 6)],
            np.r_[np.arange(6), np.arange(n_tokens - 6)],
        )
        writer.write_docs(docs)
        for address, values in states.items():
            writer.write_states(address, 0, values[:4])
            writer.write_states(address, 4, values[4:])
            if fail_after_states:
                raise RuntimeError("boom")
    return states


def test_round_trip(tmp_path):
    states = _write(tmp_path / "s.h5")
    with ActivationStore(tmp_path / "s.h5") as store:
        assert store.layers == LAYERS
        assert store.addresses == ["resid.00", "resid.02", "resid.04", "ln_final"]
        assert (store.n_tokens, store.d_model) == (10, D)
        for address, values in states.items():
            np.testing.assert_array_equal(store.read(address), values)
        np.testing.assert_array_equal(store.read(2, slice(3, 7)), states["resid.02"][3:7])
        rows = [7, 1, 1, 9]
        np.testing.assert_array_equal(store.read("resid.04", rows), states["resid.04"][rows])
        assert store.read("ln_final", slice(0, 2), dtype=np.float64).dtype == np.float64
        assert store.doc_rows("y") == slice(6, 10)
        assert store.docs()["label"].to_list() == ["a", ""]
        assert store.tokens()["token_id"].to_list() == list(range(100, 110))
        attrs = store.attrs
        assert attrs["complete"] is True and attrs["format_version"] == 1
        assert attrs["model_sha256"] == "f" * 64 and "resid/00 = embedding output" in attrs["convention"]


def test_states_are_chunked_along_tokens(tmp_path):
    _write(tmp_path / "s.h5", n_tokens=10)
    with h5py.File(tmp_path / "s.h5") as file:
        assert file["resid/02"].chunks == (chunk_rows(D, 4, 10), D)
    assert chunk_rows(576, 2, 10**6) * 576 * 2 <= 1 << 20
    assert chunk_rows(576, 2, 100) == 100


def test_bad_reads(tmp_path):
    _write(tmp_path / "s.h5")
    with ActivationStore(tmp_path / "s.h5") as store:
        with pytest.raises(KeyError, match=r"resid\.03 is not stored.*\[0, 2, 4\]"):
            store.read("resid.03")
        with pytest.raises(IndexError):
            store.read(0, [10])
        with pytest.raises(ValueError, match="not a residual address"):
            store.read("mlp_out.3")
        with pytest.raises(KeyError, match="'nope' is not in"):
            store.doc_rows("nope")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _write(tmp_path / "s.h5", fail_after_states=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_store(tmp_path):
    states = _write(tmp_path / "s.h5")
    with pytest.raises(RuntimeError):
        _write(tmp_path / "s.h5", fail_after_states=True)
    with ActivationStore(tmp_path / "s.h5") as store:
        np.testing.assert_array_equal(store.read("ln_final"), states["ln_final"])


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a workflow output gets the snakemake target that builds it, relative to here
    with pytest.raises(StoreError, match=r"does not exist\. Build it with `snakemake results/activations/m/c\.h5`"):
        ActivationStore(tmp_path / "results/activations/m/c.h5")
    with pytest.raises(StoreError, match=r"s\.h5 does not exist\. Check the path: stores are results/") as error:
        ActivationStore(tmp_path / "s.h5")
    assert "snakemake" not in str(error.value)  # no rule makes s.h5


def test_a_directory_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="is a directory, not an activation store") as error:
        ActivationStore(tmp_path)
    assert "snakemake" not in str(error.value) and "Delete" not in str(error.value)


def test_not_hdf5(tmp_path):
    (tmp_path / "s.h5").write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(StoreError, match=r"cannot be opened as HDF5.*truncated or not an HDF5 file"):
        ActivationStore(tmp_path / "s.h5")


def test_truncated_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "results/activations/m/c.h5"
    _write(path, n_tokens=2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        StoreError, match=r"truncated.*Delete it and rebuild it with `snakemake results/activations/m/c\.h5`"
    ):
        ActivationStore(path)


def test_foreign_hdf5(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as file:
        file["data"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a latent-atlas activation store") as error:
        ActivationStore(tmp_path / "s.h5")
    assert "snakemake" not in str(error.value) and "Delete" not in str(error.value)  # someone else's file


def test_incomplete_file(tmp_path):
    _write(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "a") as file:
        file.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "s.h5")


def test_missing_dataset_and_attrs(tmp_path):
    _write(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "a") as file:
        del file["resid/02"]
    with pytest.raises(StoreError, match="dataset /resid/02 listed in attrs is missing"):
        ActivationStore(tmp_path / "s.h5")
    _write(tmp_path / "t.h5")
    with h5py.File(tmp_path / "t.h5", "a") as file:
        del file.attrs["model_sha256"]
    with pytest.raises(StoreError, match=r"missing attributes \['model_sha256'\]"):
        ActivationStore(tmp_path / "t.h5")


def test_newer_format_asks_for_an_upgrade(tmp_path):
    _write(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "a") as file:
        file.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="upgrade latent-atlas"):
        ActivationStore(tmp_path / "s.h5")


def test_mismatched_inputs(tmp_path):
    _write(tmp_path / "s.h5")
    with pytest.raises(
        StoreError, match=r"made from another model than the one given .*Read it with the model"
    ) as error:
        ActivationStore(tmp_path / "s.h5", expect={"model_sha256": "abc"})
    assert "Delete" not in str(error.value)  # the model is what is wrong, not the store
    with pytest.raises(StoreError, match=r"does not match its inputs \(corpus: store has 'c', expected 'd'\)"):
        ActivationStore(tmp_path / "s.h5", expect={"corpus": "d"})
    ActivationStore(tmp_path / "s.h5", expect={"model_sha256": "f" * 64, "corpus": "c"}).close()


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(StoreError, match="store dtype 'int8'"):
        StoreWriter(tmp_path / "s.h5", 4, D, LAYERS, "int8", {})
    with (
        pytest.raises(StoreError, match="tokens/ids has 3 rows, the store 4"),
        StoreWriter(tmp_path / "s.h5", 4, D, LAYERS, "float16", {}) as writer,
    ):
        writer.write_tokens(np.zeros(3), np.zeros(3), np.zeros(3))
    assert not (tmp_path / "s.h5").exists()


def _disk_with_free_bytes(monkeypatch, free):
    monkeypatch.setattr("latent_atlas.provenance.shutil.disk_usage", lambda path: SimpleNamespace(free=free))


def test_a_store_that_would_not_fit_fails_before_writing(tmp_path, monkeypatch):
    states_bytes = 10 * D * (len(LAYERS) + 1) * 4  # float32 rows of every layer and ln_final
    _disk_with_free_bytes(monkeypatch, states_bytes - 1)
    with pytest.raises(DiskSpaceError, match=r"needs about 0\.00 GB.*`extraction\.layers`.*`extraction\.dtype`"):
        _write(tmp_path / "s.h5")
    assert list(tmp_path.iterdir()) == []
    _disk_with_free_bytes(monkeypatch, states_bytes)
    _write(tmp_path / "s.h5")
    assert ActivationStore(tmp_path / "s.h5").n_tokens == 10


def test_a_compressed_store_is_not_sized_in_advance(tmp_path, monkeypatch):
    _disk_with_free_bytes(monkeypatch, 0)
    with StoreWriter(tmp_path / "s.h5", 4, D, LAYERS, "float16", {}, compression="gzip") as writer:
        assert writer.states_nbytes == 4 * D * (len(LAYERS) + 1) * 2
