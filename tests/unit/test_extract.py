"""Extraction: stored states are the model's own states (METHODS §0.2), streamed, atomic."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.extract import ExtractionSettings, extract_activations, pack_batches, plan_extraction
from latent_atlas.store import ActivationStore
from tests.conftest import STORE_ATTRS


def _reference(loaded, text: str):
    """The model's own forward pass on one unpadded document, with every hidden state."""
    encoded = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return encoded["input_ids"][0], loaded.model(**encoded, output_hidden_states=True)


def _extract(loaded, corpus, path, **settings):
    defaults = {
        "dtype": "float32",
        "max_length": 64,
        "batch_size": 3,
        "max_batch_tokens": 64,
        "device": "cpu",
    }
    return extract_activations(
        loaded, corpus, path, ExtractionSettings(**{**defaults, **settings}), STORE_ATTRS, progress=False
    )


def test_stored_states_equal_the_models_hidden_states(tiny_loaded, tiny_corpus, tmp_path):
    path = _extract(tiny_loaded, tiny_corpus, tmp_path / "s.h5")
    n_layers = tiny_loaded.n_layers
    with ActivationStore(path) as store:
        assert store.layers == list(range(n_layers + 1))
        tokens = store.tokens()
        for doc_id, text in zip(tiny_corpus["doc_id"], tiny_corpus["text"], strict=True):
            ids, out = _reference(tiny_loaded, text)
            rows = store.doc_rows(doc_id)
            assert tokens["token_id"][rows.start : rows.stop].to_list() == ids.tolist()
            assert tokens["pos"][rows.start : rows.stop].to_list() == list(range(len(ids)))
            # hs[0..L-1] are raw residual states; hs[L] is post-final-norm (METHODS §0.2)
            for layer in range(n_layers):
                np.testing.assert_allclose(store.read(layer, rows), out.hidden_states[layer][0], atol=2e-5)
            ln_final = torch.from_numpy(store.read("ln_final", rows))
            np.testing.assert_allclose(ln_final, out.hidden_states[n_layers][0], atol=2e-5)
            # the raw last block output, normed once, is hs[L]: no double norm
            raw_last = torch.from_numpy(store.read(n_layers, rows))
            with torch.no_grad():
                renormed = tiny_loaded.parts.final_norm(raw_last)
                logits = tiny_loaded.parts.lm_head(ln_final)
            np.testing.assert_allclose(renormed, out.hidden_states[n_layers][0], atol=1e-4)
            assert not np.allclose(raw_last, ln_final, atol=1e-3)
            # lens identity: lm_head(stored post-norm state) == the model's logits
            np.testing.assert_allclose(logits, out.logits[0], atol=1e-4)


def test_float16_store_is_the_rounded_float32_state(tiny_model_dirs, tiny_corpus, tmp_path):
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    full = _extract(loaded, tiny_corpus, tmp_path / "f32.h5", dtype="float32")
    half = _extract(loaded, tiny_corpus, tmp_path / "f16.h5", dtype="float16")
    with ActivationStore(full) as a, ActivationStore(half) as b:
        assert b.attrs["dtype"] == "float16"
        for address in a.addresses:
            expected = a.read(address).astype(np.float16).astype(np.float32)
            np.testing.assert_allclose(b.read(address), expected, rtol=2e-3, atol=1e-3)


def test_batching_does_not_change_states(tiny_model_dirs, tiny_corpus, tmp_path):
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    one = _extract(loaded, tiny_corpus, tmp_path / "one.h5", batch_size=1)
    many = _extract(loaded, tiny_corpus, tmp_path / "many.h5", batch_size=8, max_batch_tokens=512)
    with ActivationStore(one) as a, ActivationStore(many) as b:
        for doc_id in tiny_corpus["doc_id"]:
            for address in a.addresses:
                np.testing.assert_allclose(
                    a.read(address, a.doc_rows(doc_id)), b.read(address, b.doc_rows(doc_id)), atol=2e-5
                )


def test_layer_and_token_selection(tiny_model_dirs, tiny_corpus, tmp_path):
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["gpt2"], device="cpu")
    all_path = _extract(loaded, tiny_corpus, tmp_path / "all.h5")
    some = _extract(
        loaded, tiny_corpus, tmp_path / "some.h5", layers=[0, -1], token_fraction=0.5, seed=3, splits=["heldout"]
    )
    with ActivationStore(all_path) as full, ActivationStore(some) as part:
        assert part.layers == [0, loaded.n_layers]
        docs = part.docs()
        assert set(docs["split"]) == {"heldout"}
        assert set(docs["doc_id"]) == set(tiny_corpus.filter(pl.col("split") == "heldout")["doc_id"])
        tokens = part.tokens()
        for doc_id, start, count in docs.select("doc_id", "token_start", "token_count").iter_rows():
            full_rows = full.doc_rows(doc_id)
            assert count == max(1, round(0.5 * (full_rows.stop - full_rows.start)))
            positions = tokens["pos"][start : start + count].to_numpy()
            assert np.all(np.diff(positions) > 0)
            np.testing.assert_allclose(
                part.read("ln_final", slice(start, start + count)),
                full.read("ln_final", full_rows.start + positions),
                atol=2e-5,
            )
        with pytest.raises(KeyError, match="not stored"):
            part.read("resid.01")


@pytest.mark.parametrize("batch_size,budget", [(1, 10), (4, 40), (32, 4096), (3, 12)])
def test_pack_batches_respects_limits_and_keeps_order(batch_size, budget):
    lengths = sorted([10, 9, 9, 7, 5, 5, 5, 3, 2, 1, 1], reverse=True)
    batches = pack_batches(lengths, batch_size, budget)
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= batch_size
        assert len(batch) == 1 or len(batch) * lengths[batch[0]] <= budget


def test_plan_sorts_longest_first(tiny_loaded, tiny_corpus):
    plan = plan_extraction(tiny_loaded.tokenizer, tiny_corpus["text"].to_list(), ExtractionSettings())
    lengths = [len(ids) for ids in plan.token_ids]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(plan.doc_index) == list(range(tiny_corpus.height))
    assert plan.n_rows == sum(lengths)


def test_an_exception_mid_extraction_leaves_no_store(tiny_model_dirs, tiny_corpus, tmp_path):
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    target = tmp_path / "s.h5"

    def interrupt(batch: int) -> None:
        if batch == 1:
            raise KeyboardInterrupt

    settings = ExtractionSettings(dtype="float32", batch_size=2, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        extract_activations(loaded, tiny_corpus, target, settings, STORE_ATTRS, progress=False, on_batch=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_extraction_leaves_no_store_at_the_final_name(tiny_model_dirs, tiny_corpus, tmp_path):
    """SIGKILL mid-run (no cleanup possible): the final name never appears; only a hidden temp file."""
    corpus_path = tmp_path / "corpus.parquet"
    tiny_corpus.write_parquet(corpus_path)
    target = tmp_path / "out" / "s.h5"
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import pathlib, time, polars as pl
        from latent_atlas.extract import ExtractionSettings, extract_activations
        from latent_atlas.models import load_model
        loaded = load_model({str(tiny_model_dirs["llama"])!r}, device="cpu")
        def pause(batch):
            pathlib.Path({str(started)!r}).touch()
            time.sleep(60)
        extract_activations(loaded, pl.read_parquet({str(corpus_path)!r}), {str(target)!r},
                            ExtractionSettings(batch_size=2, device="cpu"), {STORE_ATTRS!r},
                            progress=False, on_batch=pause)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if started.exists() or process.poll() is not None:
                break
            import time

            time.sleep(0.1)
        assert started.exists(), "the extraction never reached its first batch"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert all(p.name.startswith(".s.h5.tmp-") for p in leftovers)
    # A rerun replaces the debris and produces a complete store.
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    _extract(loaded, tiny_corpus, target)
    with ActivationStore(target) as store:
        assert store.attrs["complete"] is True


# --------------------------------------------------------------------------------------------------
# States the store's dtype cannot hold (Gemma's residual reaches ~1e5): refused, never stored as inf


def test_check_storable_refuses_float16_overflow_and_names_the_fix():
    from latent_atlas.errors import StoreError
    from latent_atlas.extract import check_storable

    states = torch.zeros(3, 4)
    states[1, 2] = -70000.0
    with pytest.raises(StoreError, match=r"resid\.02.*7e\+04.*float16's range \(±65504\).*`store_dtype: float32`"):
        check_storable("resid.02", states, torch.float16)
    check_storable("resid.02", states, torch.float32)  # float32 holds it
    states[1, 2] = 65504.0  # float16's largest finite value: storable
    check_storable("resid.02", states, torch.float16)
    check_storable("resid.02", torch.zeros(0, 4), torch.float16)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_check_storable_refuses_non_finite_states_whatever_the_dtype(bad, dtype):
    from latent_atlas.errors import StoreError
    from latent_atlas.extract import check_storable

    states = torch.ones(2, 3)
    states[0, 1] = bad
    with pytest.raises(StoreError, match=r"non-finite states at ln_final.*model_dtype"):
        check_storable("ln_final", states, dtype)


def _huge_residual_model(tiny_model_dirs, scale: float = 1e7):
    """The tiny Llama with embeddings scaled so that the residual stream exceeds float16's range."""
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    with torch.no_grad():
        loaded.parts.embed.weight.mul_(scale)
    return loaded


def test_extraction_of_states_beyond_float16_fails_and_leaves_nothing(tiny_model_dirs, tiny_corpus, tmp_path):
    from latent_atlas.errors import StoreError

    loaded = _huge_residual_model(tiny_model_dirs)
    _, out = _reference(loaded, tiny_corpus["text"][0])
    assert float(out.hidden_states[0].abs().max()) > 65504  # the premise: the residual overflows float16
    target = tmp_path / "out" / "s.h5"
    with pytest.raises(StoreError, match=r"beyond float16's range.*store_dtype: float32"):
        _extract(loaded, tiny_corpus, target, dtype="float16")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary sibling (.s.h5.tmp-<pid>) either


def test_extraction_of_states_beyond_float16_succeeds_in_float32(tiny_model_dirs, tiny_corpus, tmp_path):
    loaded = _huge_residual_model(tiny_model_dirs)
    path = _extract(loaded, tiny_corpus, tmp_path / "s.h5", dtype="float32")
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    n_layers = loaded.n_layers
    largest = 0.0
    with ActivationStore(path) as store:
        assert store.attrs["dtype"] == "float32"
        for doc_id, text in zip(tiny_corpus["doc_id"], tiny_corpus["text"], strict=True):
            _, out = _reference(loaded, text)
            rows = store.doc_rows(doc_id)
            for layer in range(n_layers):
                stored = store.read(layer, rows)
                expected = out.hidden_states[layer][0].numpy()
                np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
                largest = max(largest, float(np.abs(stored).max()))
            np.testing.assert_allclose(store.read("ln_final", rows), out.hidden_states[n_layers][0], atol=1e-4)
    assert largest > 65504


def _run_extract_script(monkeypatch, tmp_path, model_dir, corpus, model_entry: dict, name: str):
    """Run scripts/extract_activations.py in-process with a stand-in ``snakemake`` object."""
    import contextlib
    import logging
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    import latent_atlas.joblog
    from latent_atlas.corpus import write_corpus

    @contextlib.contextmanager
    def quiet_log(_path):  # the real job_log re-configures the root logger of the whole test process
        yield logging.getLogger("latent_atlas")

    monkeypatch.setattr(latent_atlas.joblog, "job_log", quiet_log)
    corpus_path = tmp_path / "corpus.parquet"
    if not corpus_path.exists():
        write_corpus(corpus, corpus_path, {"format": "test"})
    store = tmp_path / "activations" / name / "c.h5"
    snakemake = SimpleNamespace(
        log=[str(tmp_path / "logs" / f"{name}.log")],
        threads=torch.get_num_threads(),
        input=SimpleNamespace(manifest=str(Path(model_dir) / "manifest.json"), corpus=str(corpus_path)),
        output=SimpleNamespace(store=str(store)),
        params=SimpleNamespace(
            settings={"dtype": "float16", "device": "cpu", "max_length": 64, "batch_size": 4, "layers": "all"},
            model=model_entry,
            provenance={"model": name, "corpus": "c", "config_hash": "test"},
        ),
    )
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "extract_activations.py"),
                   init_globals={"snakemake": snakemake}, run_name="__main__")  # fmt: skip
    return store


def test_a_models_store_dtype_overrides_the_extraction_dtype(tiny_model_dirs, tiny_corpus, tmp_path, monkeypatch):
    """The fix the float16 error names (`store_dtype: float32` in the model's entry) is honoured by the rule."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from latent_atlas.errors import StoreError

    huge = tmp_path / "huge-model"
    shutil.copytree(tiny_model_dirs["llama"], huge)
    model = AutoModelForCausalLM.from_pretrained(huge)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e7)
    model.save_pretrained(huge)

    with pytest.raises(StoreError, match="store_dtype: float32"):
        _run_extract_script(monkeypatch, tmp_path, huge, tiny_corpus, {"source": "local"}, "plain")
    assert list((tmp_path / "activations" / "plain").iterdir()) == []

    store = _run_extract_script(
        monkeypatch, tmp_path, huge, tiny_corpus, {"source": "local", "store_dtype": "float32"}, "override"
    )
    with ActivationStore(store) as opened:
        assert opened.attrs["dtype"] == "float32"
        assert json.loads(opened.attrs["extraction"])["dtype"] == "float32"
        assert float(np.abs(opened.read(0)).max()) > 65504
    # a model without the override keeps the configured float16
    normal = _run_extract_script(monkeypatch, tmp_path, tiny_model_dirs["llama"], tiny_corpus, {}, "normal")
    with ActivationStore(normal) as opened:
        assert opened.attrs["dtype"] == "float16"


def test_a_models_store_dtype_overrides_the_sections_dtype():
    section = {"dtype": "float16", "layers": "all", "unknown_key": 1}
    assert ExtractionSettings.for_model(section, {"store_dtype": "float32"}).dtype == "float32"
    assert ExtractionSettings.for_model(section, {}).dtype == "float16"


def test_the_store_records_the_dtype_the_forward_passes_ran_in(tiny_model_dirs, tiny_corpus, tmp_path):
    from latent_atlas.models import load_model

    auto = load_model(tiny_model_dirs["llama"], "cpu", "auto")  # auto is float32 on the CPU
    with ActivationStore(_extract(auto, tiny_corpus, tmp_path / "auto.h5", model_dtype="auto")) as store:
        assert store.attrs["model_dtype"] == "float32"
        full = {layer: store.read(layer) for layer in store.layers}
    half = load_model(tiny_model_dirs["llama"], "cpu", "bfloat16")
    with ActivationStore(_extract(half, tiny_corpus, tmp_path / "half.h5", model_dtype="bfloat16")) as store:
        assert store.attrs["model_dtype"] == "bfloat16" and store.stored_dtype(1) == np.float32
        for layer, states in full.items():  # the same states to bfloat16's ~3 significant digits
            scale = np.abs(states).max()
            np.testing.assert_allclose(store.read(layer), states, rtol=0, atol=0.05 * scale)
