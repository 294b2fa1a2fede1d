"""Lenses: METHODS §10 checks 1, 2 and 4, save/load, and the per-layer evaluation."""

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.errors import LatentAtlasError
from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.lenses import InverseEmbeddingLens, LogitLens, SemanticBasisLens, TunedLens, Unembed
from latent_atlas.lenses.evaluate import evaluate_lenses, evaluation_tokens
from latent_atlas.lenses.tuned import (
    HeldOutStopping,
    TrainingBatch,
    TunedLensTraining,
    held_out_kl,
    hold_out_documents,
    kl_to_target,
    sampled_batches,
    train_tuned_lens,
)
from latent_atlas.models import load_model
from latent_atlas.store import ActivationStore
from latent_atlas.testing import _WORDS
from tests.conftest import STORE_ATTRS


def _random_corpus(n_docs: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(_WORDS, size=rng.integers(12, 30))) for _ in range(n_docs)]
    return pl.DataFrame(
        {
            "doc_id": [f"r{i}" for i in range(n_docs)],
            "text": texts,
            "label": ["x"] * n_docs,
            "split": ["heldout" if i % 4 == 0 else "train" for i in range(n_docs)],
            "source": ["test"] * n_docs,
        }
    )


def reference_lens_metrics(final: torch.Tensor, log_p: torch.Tensor, next_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every lens metric of METHODS §2, from whole float64 log-distributions (the model's and the lens's)."""
    has_next = next_ids >= 0
    rank = (log_p > log_p.gather(-1, final.argmax(-1, keepdim=True))).sum(-1).double()
    return {
        "kl_to_final": (final.exp() * (final - log_p)).sum(-1).mean(),
        "entropy": -(log_p.exp() * log_p).sum(-1).mean(),
        "ce_next_token": -log_p[has_next].gather(-1, next_ids[has_next, None]).mean(),
        "surprisal": -final.gather(-1, log_p.argmax(-1, keepdim=True)).mean(),
        "top1_agreement": (log_p.argmax(-1) == final.argmax(-1)).double().mean(),
        "final_top1_rank": rank.median(),
    }


@pytest.fixture(scope="module")
def llama_store(tiny_model_dirs, tmp_path_factory):
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    path = tmp_path_factory.mktemp("lens") / "s.h5"
    settings = ExtractionSettings(dtype="float32", device="cpu")
    extract_activations(loaded, _random_corpus(120), path, settings, STORE_ATTRS, progress=False)
    return loaded, path


def test_logit_lens_at_the_last_layer_is_the_model(tiny_loaded):
    encoded = tiny_loaded.tokenizer("the dog saw a cat at night .", return_tensors="pt")
    with torch.no_grad():
        out = tiny_loaded.model(**encoded, output_hidden_states=True)
        captured = {}
        handle = tiny_loaded.parts.layers[-1].register_forward_hook(
            lambda m, a, o: captured.update(raw=o[0] if isinstance(o, tuple) else o)
        )
        tiny_loaded.model(**encoded)
        handle.remove()
        lens = LogitLens(Unembed.from_parts(tiny_loaded.parts))
        logits = lens.logits(captured["raw"], tiny_loaded.n_layers)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    kl = torch.nn.functional.kl_div(
        logits.log_softmax(-1), out.logits.log_softmax(-1), log_target=True, reduction="sum"
    )
    assert float(kl) < 1e-6


def test_untrained_tuned_lens_is_the_logit_lens(tiny_loaded):
    unembed = Unembed.from_parts(tiny_loaded.parts)
    tuned, logit = TunedLens(unembed, tiny_loaded.n_layers, tiny_loaded.d_model), LogitLens(unembed)
    h = torch.randn(5, 7, tiny_loaded.d_model)
    for layer in range(tiny_loaded.n_layers + 1):
        assert torch.equal(tuned.logits(h, layer), logit.logits(h, layer))


def test_trained_tuned_lens_beats_the_logit_lens_on_held_out_tokens(llama_store, tmp_path):
    loaded, path = llama_store
    unembed = Unembed.from_parts(loaded.parts)
    lens = TunedLens(unembed, loaded.n_layers, loaded.d_model)
    with ActivationStore(path) as store:
        train = evaluation_tokens(store, "train", None, skip_first_position=True)
        final = torch.from_numpy(store.read("ln_final", train.rows))
        settings = TunedLensTraining(steps=150, tokens_per_step=128, lr_scale=4.0)
        layers = range(loaded.n_layers)
        batches = sampled_batches(
            lambda layer: torch.from_numpy(store.read(layer, train.rows)), final, layers, settings
        )
        losses = train_tuned_lens(lens, batches, layers, settings)
        assert np.mean(losses[-10:]) < np.mean(losses[:10])
        heldout = evaluation_tokens(store, "heldout", None, skip_first_position=True)
        table = evaluate_lenses(store, unembed, {"logit": LogitLens(unembed), "tuned": lens}, store.layers, heldout)
    kl = table.filter(pl.col("metric") == "kl_to_final").pivot(on="lens", index="layer", values="value").sort("layer")
    assert (kl["tuned"] <= kl["logit"] + 1e-6).all(), kl
    assert (kl["tuned"][:-1] < kl["logit"][:-1]).all(), kl
    assert kl["logit"][-1] < 1e-9 and kl["tuned"][-1] < 1e-9

    lens.save(tmp_path / "t.pt", extra={"losses": losses})
    reloaded = TunedLens.load(tmp_path / "t.pt", unembed)
    h = torch.randn(3, loaded.d_model)
    for layer in range(loaded.n_layers + 1):
        assert torch.equal(reloaded.logits(h, layer), lens.logits(h, layer))
    assert TunedLens.read_config(tmp_path / "t.pt")["losses"] == losses


def test_tuned_lens_refuses_another_models_unembedding(tiny_model_dirs, tmp_path):
    llama = load_model(tiny_model_dirs["llama"], device="cpu")
    gemma = load_model(tiny_model_dirs["gemma3"], device="cpu")
    TunedLens(Unembed.from_parts(llama.parts), llama.n_layers, llama.d_model).save(tmp_path / "t.pt")
    with pytest.raises(LatentAtlasError, match="trained for another model"):
        TunedLens.load(tmp_path / "t.pt", Unembed.from_parts(gemma.parts))
    with pytest.raises(LatentAtlasError, match="no tuned lens at"):
        TunedLens.load(tmp_path / "none.pt", Unembed.from_parts(gemma.parts))


def test_semantic_bases_pseudo_inverse_identities(tiny_loaded):
    """METHODS §4 (a, b): W^+W is a projector of trace d, sum_i s_i.w_i = d, W W^+ = I_d, three routes agree."""
    lens = SemanticBasisLens(Unembed.from_parts(tiny_loaded.parts))
    head = tiny_loaded.parts.lm_head.weight.detach().to(torch.float64).T  # W: d x V
    d = head.shape[0]
    bases = lens.bases  # W^+: V x d
    projector = bases @ head
    torch.testing.assert_close(projector @ projector, projector, atol=1e-10, rtol=0)
    assert abs(float(torch.trace(projector)) - d) < 1e-8
    assert abs(float((bases * head.T).sum()) - d) < 1e-8
    torch.testing.assert_close(head @ bases, torch.eye(d, dtype=torch.float64), atol=1e-10, rtol=0)
    via_lstsq = torch.linalg.lstsq(head, torch.eye(d, dtype=torch.float64), driver="gelsd").solution
    via_gram = head.T @ torch.linalg.inv(head @ head.T)
    torch.testing.assert_close(bases, via_lstsq.to(torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(bases, via_gram, atol=1e-8, rtol=0)
    assert lens.pinv.rank == d and lens.condition_number >= 1


def test_semantic_basis_logits_are_scaled_cosines(tiny_loaded):
    unembed = Unembed.from_parts(tiny_loaded.parts)
    lens = SemanticBasisLens(unembed, temperature=0.5)
    h = torch.randn(4, tiny_loaded.d_model)
    normed = unembed.final_norm(h).double()
    bases = lens.bases
    live = bases.norm(dim=-1) > 1e-8  # a padding token's zero embedding has a zero basis: its cosine is 0
    expected = (normed / normed.norm(dim=-1, keepdim=True)) @ (bases[live] / bases[live].norm(dim=-1, keepdim=True)).T
    logits = lens.logits(h, 1).double()
    torch.testing.assert_close(logits[:, live], expected / 0.5, atol=1e-5, rtol=0)
    assert torch.all(logits[:, ~live] == 0)
    assert logits.abs().max() <= 2.0 + 1e-5


def test_inverse_embedding_lens(tiny_loaded):
    embedding = tiny_loaded.parts.embed.weight.detach()
    transpose = InverseEmbeddingLens(embedding, "transpose")
    pinv = InverseEmbeddingLens(embedding, "pinv")
    torch.testing.assert_close(
        pinv.reader.double() @ embedding.double(), torch.eye(embedding.shape[1], dtype=torch.float64), atol=1e-4, rtol=0
    )
    h = torch.randn(3, embedding.shape[1]) * 100
    scale = embedding.norm(dim=-1).mean()
    expected = (h / h.norm(dim=-1, keepdim=True) * scale) @ embedding.T
    torch.testing.assert_close(transpose.logits(h, 0), expected, atol=1e-4, rtol=1e-5)
    assert transpose.name == "inverse_embedding_transpose" and pinv.name == "inverse_embedding_pinv"


def test_evaluation_metrics_at_the_last_layer(llama_store):
    loaded, path = llama_store
    unembed = Unembed.from_parts(loaded.parts)
    with ActivationStore(path) as store:
        tokens = evaluation_tokens(store, "heldout", None, skip_first_position=False)
        table = evaluate_lenses(
            store, unembed, {"logit": LogitLens(unembed)}, [0, loaded.n_layers], tokens, chunk_size=7
        )
        final = table.filter(pl.col("layer") == loaded.n_layers)
        value = dict(zip(final["metric"], final["value"], strict=True))
        assert value["kl_to_final"] < 1e-9 and value["top1_agreement"] == 1.0 and value["final_top1_rank"] == 0
        # cross-entropy to the next token equals the model's own loss on those documents
        docs = store.docs().filter(pl.col("split") == "heldout")
        losses, count, surprisal = 0.0, 0, 0.0
        for doc_id in docs["doc_id"]:
            ids = store.tokens()["token_id"][store.doc_rows(doc_id)].to_list()
            with torch.no_grad():
                out = loaded.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
            losses += float(out.loss) * (len(ids) - 1)
            count += len(ids) - 1
            surprisal -= float(out.logits[0].double().log_softmax(-1).max(-1).values.sum())
        assert value["ce_next_token"] == pytest.approx(losses / count, rel=1e-4)
        # the logit lens's top-1 is the model's: its surprisal is -log max p_final, averaged over every token
        assert value["surprisal"] == pytest.approx(surprisal / len(tokens.rows), rel=1e-4)
        assert set(table["metric"]) == {
            "kl_to_final",
            "ce_next_token",
            "entropy",
            "top1_agreement",
            "surprisal",
            "final_top1_rank",
            "agreement_with_logit",
        }
        with pytest.raises(Exception, match="does not hold"):
            evaluate_lenses(store, unembed, {"logit": LogitLens(unembed)}, [99], tokens)


def test_tied_models_share_one_svd_with_the_same_result(tiny_model_dirs):
    from latent_atlas.lenses.pipeline import build_lenses

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    lenses = build_lenses(loaded, {}, None)
    fresh = InverseEmbeddingLens(loaded.parts.embed.weight, "pinv")
    torch.testing.assert_close(lenses["inverse_embedding_pinv"].reader, fresh.reader, atol=1e-5, rtol=0)
    assert set(lenses) == {"logit", "semantic_basis", "inverse_embedding_transpose", "inverse_embedding_pinv"}


def test_held_out_documents_are_whole_and_disjoint_from_training() -> None:
    docs = np.repeat(np.arange(10), 7)
    rows = np.arange(70)
    train, held = hold_out_documents(rows, docs, 15, seed=3)
    assert len(held) == 21 and len(train) == 49  # three documents of 7 reach 15
    assert set(docs[held]).isdisjoint(docs[train]) and set(train) | set(held) == set(rows)
    train_all, held_all = hold_out_documents(rows, docs, 10_000, seed=3)
    assert (len(train_all), len(held_all)) == (7, 63)  # one document always stays for training


def test_held_out_stopping_stops_on_a_plateau_and_records_the_curve(llama_store) -> None:
    loaded, path = llama_store
    unembed = Unembed.from_parts(loaded.parts)
    with ActivationStore(path) as store:
        every = evaluation_tokens(store, "train", None, skip_first_position=True)
        train_rows, held_rows = hold_out_documents(every.rows, every.docs, 64, seed=0)
        layers = [1, 2]
        held = TrainingBatch({k: torch.from_numpy(store.read(k, held_rows)) for k in layers},
                             torch.from_numpy(store.read("ln_final", held_rows)))  # fmt: skip
        final = torch.from_numpy(store.read("ln_final", train_rows))
        states = {k: torch.from_numpy(store.read(k, train_rows)) for k in layers}
    lens = TunedLens(unembed, loaded.n_layers, loaded.d_model)
    untrained = held_out_kl(lens, held, layers)
    expected = np.mean([float(kl_to_target(torch.log_softmax(unembed.lm_head(held.final).float(), -1),
                                           LogitLens(unembed).logits(held.states[k], k))) for k in layers])  # fmt: skip
    assert untrained == pytest.approx(expected, rel=1e-5)  # an untrained tuned lens is the logit lens
    settings = TunedLensTraining(steps=400, tokens_per_step=64, lr_scale=4.0)
    stopping = HeldOutStopping(held, eval_every=10, patience=2, min_improvement=0.5)  # a plateau comes soon
    losses = train_tuned_lens(lens, sampled_batches(lambda k: states[k], final, layers, settings), layers, settings,
                              stopping=stopping)  # fmt: skip
    steps = [step for step, _ in stopping.curve]
    assert len(losses) < 400 and steps == list(range(10, len(losses) + 1, 10))
    kls = [kl for _, kl in stopping.curve]
    assert kls[0] < untrained  # it learned
    assert kls[-1] > min(kls) * 0.5 and kls[-2] > min(kls) * 0.5  # the last two measurements made no 50% gain


def test_evaluation_metrics_equal_a_float64_reference_for_every_lens(llama_store):
    """The shared log-sum-exp gives each metric as a plain float64 log-softmax computes it, for every lens."""
    loaded, path = llama_store
    unembed = Unembed.from_parts(loaded.parts)
    lenses = {
        "logit": LogitLens(unembed),
        "semantic_basis": SemanticBasisLens(unembed, temperature=0.05),
        "inverse_embedding_transpose": InverseEmbeddingLens(loaded.parts.embed.weight, "transpose"),
    }
    layers = [1, loaded.n_layers]
    with ActivationStore(path) as store, torch.no_grad():
        tokens = evaluation_tokens(store, "heldout", None, skip_first_position=False)
        table = evaluate_lenses(store, unembed, lenses, layers, tokens, chunk_size=5)
        final = unembed.lm_head(torch.from_numpy(store.read("ln_final", tokens.rows))).double().log_softmax(-1)
        next_ids = torch.from_numpy(tokens.next_ids).long()
        for name, lens in lenses.items():
            for layer in layers:
                log_p = lens.logits(torch.from_numpy(store.read(layer, tokens.rows)), layer).double().log_softmax(-1)
                expected = reference_lens_metrics(final, log_p, next_ids)
                rows = table.filter((pl.col("lens") == name) & (pl.col("layer") == layer))
                value = dict(zip(rows["metric"], rows["value"], strict=True))
                for metric, reference in expected.items():
                    assert value[metric] == pytest.approx(float(reference), rel=1e-5, abs=1e-6), (name, layer, metric)
