"""Lens metrics streamed over vocabulary blocks, and the tuned lens's fused KL, against float64 references."""

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.architectures import LogitTransform, ScaledHead
from latent_atlas.lenses import InverseEmbeddingLens, LogitLens, SemanticBasisLens, TunedLens, Unembed
from latent_atlas.lenses.base import Lens, Readout
from latent_atlas.lenses.evaluate import FinalDistribution, _token_metrics, evaluate_lenses, evaluation_tokens
from latent_atlas.lenses.patchscope import IdentityPatchscope
from latent_atlas.lenses.streaming import Blocks, KeptBlocks, Reference, row_stats
from latent_atlas.lenses.temperature import TemperatureScaledLens
from latent_atlas.store import ActivationStore
from tests.unit.test_lenses import reference_lens_metrics

V, D, N = 103, 12, 9
WIDTHS = [1, 7, 16, 50, V, 4096]  # one column, widths that do not divide V, one block, wider than V


def _readout(seed: int = 0, softcap: float | None = None, temperature: float = 1.0) -> Readout:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=generator)
    weight[[40, 41, 90]] = weight[5].clone()  # tokens 5, 40, 41, 90 always tie
    bias = torch.randn(V, generator=generator) * 0.1
    bias[[40, 41, 90]] = bias[5].clone()
    return Readout(weight, bias, LogitTransform(scale=1.5, softcap=softcap), temperature)


def _reference(logits: torch.Tensor, q: torch.Tensor, next_ids: torch.Tensor, rank_ids: torch.Tensor) -> dict:
    """Every statistic from a float64 log-softmax of the full logits."""
    z = logits.double()
    log_p = z.log_softmax(-1)
    has_next = next_ids >= 0
    return {
        "top1": z.argmax(-1),  # the first on ties
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "cross_entropy": -(q.double() * log_p).sum(-1),  # -sum_v q_v log p_v
        "ce": -log_p[has_next].gather(-1, next_ids[has_next, None]).squeeze(-1),
        "rank": (z > z.gather(-1, rank_ids[:, None])).sum(-1),
    }


def _streamed(blocks: Blocks | KeptBlocks, q: torch.Tensor, next_ids: torch.Tensor, rank_ids: torch.Tensor) -> dict:
    """The same statistics from :func:`row_stats`."""
    width = blocks.width
    q_blocks = list(q.split(width, dim=1))
    reference = Reference(q_blocks, torch.stack([block.sum(1) for block in q_blocks], 1))
    stats = row_stats(blocks, reference, next_ids, rank_ids)
    has_next = next_ids >= 0
    return {
        "top1": stats.top1,
        "entropy": stats.log_total - stats.weighted / stats.total,
        "cross_entropy": -(stats.cross - stats.log_total * q.sum(1)),
        "ce": (stats.log_total - (stats.at_next - stats.top))[has_next],
        "rank": stats.above,
    }


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=generator) * 2
    q = torch.softmax(torch.randn(N, V, generator=generator) * 3, -1)
    next_ids = torch.randint(0, V, (N,), generator=generator)
    next_ids[[2, 6]] = -1  # no next token
    rank_ids = torch.randint(0, V, (N,), generator=generator)
    rank_ids[[0, 3]] = 40  # a token with three exact ties (5, 41, 90)
    rank_ids[1] = V - 1  # the last column, in the last (partial) block
    return hidden, q, next_ids, rank_ids


def _assert_equal(found: dict, expected: dict, context: object) -> None:
    for key in ("top1", "rank"):
        assert torch.equal(found[key].long(), expected[key].long()), (key, context)
    for key in ("entropy", "cross_entropy", "ce"):
        torch.testing.assert_close(found[key].double(), expected[key], atol=2e-5, rtol=2e-5, msg=f"{key} {context}")


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(("softcap", "temperature"), [(None, 1.0), (4.0, 1.0), (None, 0.3), (4.0, 0.3)])
def test_streamed_statistics_equal_a_float64_log_softmax(width: int, softcap: float | None, temperature: float):
    readout = _readout(softcap=softcap, temperature=temperature)
    hidden, q, next_ids, rank_ids = _inputs()
    logits = readout.logits(hidden)
    expected = _reference(logits, q, next_ids, rank_ids)
    for blocks in (Blocks(readout, hidden, width=width), Blocks(None, logits=logits, width=width)):
        _assert_equal(_streamed(blocks, q, next_ids, rank_ids), expected, (width, softcap, blocks.overwritable))
    kept = Blocks(readout, hidden, width=width).kept()
    before = [block.clone() for block in kept.blocks]
    _assert_equal(_streamed(kept, q, next_ids, rank_ids), expected, (width, softcap, "kept"))
    assert all(torch.equal(block, old) for block, old in zip(kept.blocks, before, strict=True))  # left as they were
    torch.testing.assert_close(torch.cat(kept.blocks, 1), logits, atol=1e-5, rtol=1e-5)
    if softcap is not None:
        assert logits.abs().max() <= softcap / temperature + 1e-5


def test_ties_take_the_first_top1_and_are_not_counted_in_the_rank():
    readout = _readout()
    hidden = readout.weight[[5, 40, 41]] * 3  # each row's largest logit is the tied group 5, 40, 41, 90
    rank_ids = torch.tensor([90, 5, 41])
    for width in WIDTHS:
        stats = row_stats(Blocks(readout, hidden, width=width), rank_ids=rank_ids)
        logits = readout.logits(hidden)
        assert (logits[:, [5, 40, 41, 90]] == logits.max(-1, keepdim=True).values).all()
        assert stats.top1.tolist() == [5, 5, 5], width
        assert stats.above.tolist() == [0, 0, 0], width


def test_a_threshold_that_misses_the_blocks_logit_is_recounted(monkeypatch):
    """Where the BLAS rounded the threshold unlike the block, the rank comes from the row's full logits."""
    readout = _readout()
    hidden, _, _, rank_ids = _inputs()
    expected = _reference(readout.logits(hidden), torch.full((N, V), 1.0 / V), rank_ids, rank_ids)["rank"]
    honest = Blocks.at
    monkeypatch.setattr(Blocks, "at", lambda self, ids: honest(self, ids) - 1e-3)  # a threshold a bit low
    stats = row_stats(Blocks(readout, hidden, width=16), rank_ids=rank_ids)
    assert torch.equal(stats.above, expected)


def test_a_readout_block_is_the_full_logits_columns():
    readout = _readout(softcap=4.0, temperature=0.5)
    hidden = _inputs()[0]
    logits = readout.logits(hidden)
    torch.testing.assert_close(readout.logits(hidden, 30, 61), logits[:, 30:61], atol=1e-5, rtol=1e-5)
    ids = torch.arange(N) * 11
    torch.testing.assert_close(readout.logits_at(hidden, ids), logits.gather(1, ids[:, None]).squeeze(1))
    assert readout.logits(hidden[0]).shape == (V,) and readout.logits(hidden.view(3, 3, D)).shape == (3, 3, V)


class _Opaque(Lens):
    """A lens read only through its logits (no readout): the evaluation materialises them."""

    name = "opaque"

    def __init__(self, inner: Lens) -> None:
        super().__init__()
        self.inner = inner

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.inner.logits(h, layer)


def _every_lens(loaded) -> dict:
    unembed = Unembed.from_parts(loaded.parts)
    tuned = TunedLens(unembed, loaded.n_layers, loaded.d_model)
    with torch.no_grad():
        for translator in tuned.translators:
            translator.weight.normal_(0, 0.05)
            translator.bias.normal_(0, 0.05)
    tuned.trained_layers = list(range(loaded.n_layers))
    semantic = SemanticBasisLens(unembed, temperature=0.05)
    embedding = loaded.parts.embed.weight
    return {
        "logit": LogitLens(unembed),
        "tuned": tuned,
        "semantic_basis": TemperatureScaledLens(semantic, {layer: 0.7 for layer in range(loaded.n_layers + 1)}),
        "inverse_embedding_transpose": InverseEmbeddingLens(embedding, "transpose"),
        "inverse_embedding_pinv": TemperatureScaledLens(
            InverseEmbeddingLens(embedding, "pinv"), {layer: 2.0 for layer in range(loaded.n_layers + 1)}
        ),
        "patchscope_identity": IdentityPatchscope(loaded, batch_size=64),
        "opaque": _Opaque(tuned),
    }


def test_every_lens_factors_into_its_hidden_map_and_readout(tiny_loaded):
    h = torch.randn(5, tiny_loaded.d_model) * 3
    with torch.no_grad():
        for name, lens in _every_lens(tiny_loaded).items():
            if lens.readout(0) is None:
                continue
            for layer in (0, 1, tiny_loaded.n_layers):
                factored = lens.readout(layer).logits(lens.hidden(h, layer))
                torch.testing.assert_close(factored, lens.logits(h, layer), atol=1e-5, rtol=1e-5, msg=name)


def test_soft_capped_head_through_the_evaluation_metrics():
    """The model's soft-cap applied block by block: every metric of a soft-capped head against float64."""
    generator = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=generator) * 2)
    unembed = Unembed(torch.nn.Identity(), ScaledHead(head, LogitTransform(softcap=3.0)))
    assert unembed.readout() is not None and unembed.readout().transform.softcap == 3.0
    final_states = torch.randn(N, D, generator=generator)
    states = final_states + torch.randn(N, D, generator=generator)
    next_ids = torch.randint(0, V, (N,), generator=generator)
    with torch.no_grad():
        reference = torch.log_softmax(unembed.lm_head(final_states).double(), -1)
        log_p = torch.log_softmax(unembed(states).double(), -1)
        for width in (5, 32, V):
            final = FinalDistribution.of(unembed, final_states, width)
            metrics, top1 = _token_metrics(Blocks.of(LogitLens(unembed), states, 1, width), final, next_ids)
            expected = {
                "kl_to_final": (reference.exp() * (reference - log_p)).sum(-1),
                "entropy": -(log_p.exp() * log_p).sum(-1),
                "ce_next_token": -log_p.gather(-1, next_ids[:, None]).squeeze(-1),
                "surprisal": -reference.gather(-1, log_p.argmax(-1, keepdim=True)).squeeze(-1),
                "final_top1_rank": (log_p > log_p.gather(-1, reference.argmax(-1, keepdim=True))).sum(-1),
            }
            for metric, values in expected.items():
                np.testing.assert_allclose(metrics[metric][0], values.numpy(), atol=2e-5, rtol=1e-5, err_msg=metric)
            assert torch.equal(top1, log_p.argmax(-1))
            same, _ = _token_metrics(Blocks.of(LogitLens(unembed), final_states, 1, width), final, next_ids)
            assert (same["kl_to_final"][0] == 0).all()  # the model's own logits: KL exactly 0


@pytest.fixture(scope="module")
def small_store(tiny_model_dirs, tmp_path_factory):
    from latent_atlas.extract import ExtractionSettings, extract_activations
    from latent_atlas.models import load_model
    from tests.conftest import STORE_ATTRS
    from tests.unit.test_lenses import _random_corpus

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    path = tmp_path_factory.mktemp("streaming") / "s.h5"
    extract_activations(loaded, _random_corpus(12), path, ExtractionSettings(dtype="float32", device="cpu"),
                        STORE_ATTRS, False)  # fmt: skip
    return loaded, path


@pytest.mark.parametrize("vocab_block", [7, 16, 71])
def test_evaluation_is_the_same_at_every_block_width(small_store, vocab_block):
    """The evaluation's table at a few widths (71 = one block for the tiny vocabulary) against float64."""
    loaded, path = small_store
    lenses = _every_lens(loaded)
    unembed = lenses["logit"].unembed
    layers = [0, 1, loaded.n_layers]
    with ActivationStore(path) as store, torch.no_grad():
        tokens = evaluation_tokens(store, "heldout", None, skip_first_position=False)
        table = evaluate_lenses(store, unembed, lenses, layers, tokens, chunk_size=16, vocab_block=vocab_block)
        final = unembed.lm_head(torch.from_numpy(store.read("ln_final", tokens.rows))).double().log_softmax(-1)
        next_ids = torch.from_numpy(tokens.next_ids).long()
        for name, lens in lenses.items():
            for layer in layers:
                states = torch.from_numpy(store.read(layer, tokens.rows))
                log_p = lens.logits(states, layer).double().log_softmax(-1)
                expected = reference_lens_metrics(final, log_p, next_ids)
                rows = table.filter((pl.col("lens") == name) & (pl.col("layer") == layer))
                value = dict(zip(rows["metric"], rows["value"], strict=True))
                for metric, reference in expected.items():
                    assert value[metric] == pytest.approx(float(reference), rel=1e-5, abs=1e-5), (name, layer, metric)
        logit_last = table.filter((pl.col("lens") == "logit") & (pl.col("layer") == loaded.n_layers))
        assert dict(zip(logit_last["metric"], logit_last["value"], strict=True))["kl_to_final"] < 1e-9


@pytest.mark.parametrize(
    ("softcap", "temperature", "slab"), [(None, 1.0, 4), (3.0, 1.0, 16), (None, 0.4, 5), (3.0, 0.4, 1)]
)
def test_fused_kl_and_its_gradient_equal_float64_autograd(softcap: float | None, temperature: float, slab: int):
    """The tuned lens's loss: value and gradient against a float64 log-softmax differentiated by autograd."""
    from latent_atlas.lenses.tuned import TargetDistribution, fused_kl

    readout = _readout(softcap=softcap, temperature=temperature)
    hidden, q, _, _ = _inputs()
    target = TargetDistribution(q, q.sum(1), (q * q.log()).sum(1))
    hidden64 = hidden.double().requires_grad_()
    weight, bias = readout.weight.double(), readout.bias.double()
    raw = (hidden64 @ weight.T + bias) * 1.5
    logits = (raw if softcap is None else torch.tanh(raw / softcap) * softcap) / temperature
    expected = (q.double() * (q.double().log() - logits.log_softmax(-1))).sum(-1).mean()
    expected.backward()
    found_input = hidden.clone().requires_grad_()
    found = fused_kl(found_input, readout, target, slab)
    (found * 2.0).backward()  # the upstream gradient scales the saved one
    torch.testing.assert_close(found.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found_input.grad.double(), 2.0 * hidden64.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused_kl(hidden, readout, target, slab), found.detach())


def test_a_lens_without_readout_trains_on_the_same_loss(tiny_loaded):
    """lens_kl falls back to the lens's logits where there is no readout: the same value and gradient."""
    from latent_atlas.lenses.tuned import TargetDistribution, lens_kl

    unembed = Unembed.from_parts(tiny_loaded.parts)
    tuned = TunedLens(unembed, tiny_loaded.n_layers, tiny_loaded.d_model)
    states, final = torch.randn(6, tiny_loaded.d_model) * 3, torch.randn(6, tiny_loaded.d_model)
    with torch.no_grad():
        target = TargetDistribution.of(unembed, final)
    losses, grads = [], []
    for lens in (tuned, _Opaque(tuned)):
        tuned.translators[1].zero_grad()
        loss = lens_kl(lens, states, 1, target)
        loss.backward()
        losses.append(loss.detach())
        grads.append(tuned.translators[1].weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_block_passes_run_on_one_thread_and_restore_the_callers_count():
    from latent_atlas.lenses.streaming import single_threaded

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []
        readout = _readout()
        blocks = Blocks(readout, _inputs()[0], width=16)
        blocks.block = lambda start, keep=False: (seen.append(torch.get_num_threads()), Blocks.block(blocks, start))[1]
        row_stats(blocks)
        assert seen and set(seen) == {2} and torch.get_num_threads() == 2  # products: the caller's threads
        with pytest.raises(RuntimeError), single_threaded():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
