"""ELM (METHODS §6): stage 1 leaves the LM bit-identical, soft-token norms, target-only loss, controls,
a learnable synthetic task, cached generation equals recomputation, save/load, the judge."""

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM

from latent_atlas.errors import ConfigError, LatentAtlasError
from latent_atlas.models import LoadedModel, locate_parts
from latent_atlas.readers import elm
from latent_atlas.readers.elm.generation import _decode
from latent_atlas.testing import tiny_config, tiny_tokenizer

TEXT = "the old dog saw a small cat by the river ."
WORDS = ["dog", "cat", "house", "river"]
PROMPT = "the <embedding> is a"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest and immune to other jobs on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(arch="llama", seed=0, d_model=64, init=0.02, n_layers=2):
    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, len(tokenizer), n_layers, d_model)
    config.initializer_range = init  # 0.2: logits large enough for a frozen random LM to be steered clearly
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model, tokenizer, {"d_model": d_model}, locate_parts(model), torch.device("cpu"))


def _clusters(n, seed=0, d_w=16):
    """``n`` random points around 4 centres; the target of a point is its cluster's word."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    points = (torch.randn(4, d_w, generator=generator) * 3)[labels] + torch.randn(n, d_w, generator=generator)
    return points, elm.make_examples(range(n), [WORDS[int(label)] for label in labels], PROMPT)


def _text_logits(loaded):
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def test_stage_one_leaves_the_base_model_bit_identical():
    loaded = _tiny()
    before = _text_logits(loaded)
    weights = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    points, examples = _clusters(32)
    adapter = elm.EmbeddingAdapter.for_model(loaded, 16, n_soft=2, hidden=32)
    initial = [p.detach().clone() for p in adapter.parameters()]
    elm.train_adapter(loaded, adapter, points, examples[:24], examples[24:], 6, 8, 1e-2, eval_every=3, progress=False)
    assert torch.equal(_text_logits(loaded), before)
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, weights[name]), name
        assert p.grad is None, name
        assert p.requires_grad  # the flags are restored after training
    assert not loaded.model.training
    assert any(not torch.equal(a, b) for a, b in zip(adapter.parameters(), initial, strict=True))


def test_stage_one_backward_reaches_the_adapter_only():
    loaded = _tiny()
    points, examples = _clusters(8)
    adapter = elm.EmbeddingAdapter.for_model(loaded, 16, n_soft=2, hidden=32)
    with elm.lm_trainable(loaded, False):
        rows = [e.embedding_index for e in examples]
        batch = elm.build_batch(
            loaded, elm.encode_examples(loaded.tokenizer, examples), elm.soft_tokens(adapter, points, rows)
        )
        elm.example_nll(loaded, batch).mean().backward()
    assert all(p.grad is None for p in loaded.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_stage_two_fine_tunes_the_model_and_needs_its_learning_rate():
    loaded = _tiny()
    before = _text_logits(loaded)
    points, examples = _clusters(16)
    adapter = elm.EmbeddingAdapter.for_model(loaded, 16, hidden=32)
    with pytest.raises(ConfigError, match="lm_lr"):
        elm.train_adapter(loaded, adapter, points, examples, [], 2, 4, stage=2, progress=False)
    elm.train_adapter(loaded, adapter, points, examples, [], 2, 4, stage=2, lm_lr=1e-3, progress=False)
    assert not torch.equal(_text_logits(loaded), before)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_soft_token_norms_sit_in_the_token_embedding_norm_range(arch):
    loaded = _tiny(arch)
    norms = elm.embedding_norms(loaded.parts)
    weight_norms = loaded.parts.embed.weight.detach().norm(dim=-1)
    scale = loaded.d_model**0.5 if arch == "gemma3" else 1.0  # Gemma scales inside its embedding module
    assert norms.median == pytest.approx(float(weight_norms.median()) * scale, rel=1e-5)
    assert norms.maximum == pytest.approx(float(weight_norms.max()) * scale, rel=1e-5)
    assert elm.typical_embedding_norm(loaded.parts) == norms.median
    adapter = elm.EmbeddingAdapter.for_model(loaded, 8, n_soft=3, hidden=16)
    generator = torch.Generator().manual_seed(0)
    for magnitude in (1e-3, 1.0, 1e3):
        soft = adapter(torch.randn(5, 8, generator=generator) * magnitude)
        assert soft.shape == (5, 3, loaded.d_model)
        soft_norms = soft.detach().norm(dim=-1)
        torch.testing.assert_close(soft_norms, torch.full_like(soft_norms, norms.median))
        assert norms.minimum <= float(soft_norms.min()) and float(soft_norms.max()) <= norms.maximum


def test_the_loss_scores_the_target_tokens_only():
    loaded = _tiny(init=0.2)
    examples = [
        elm.ElmExample(0, "the <embedding> is a", "dog"),
        elm.ElmExample(1, "a very old <embedding> was by the", "small red house"),
        elm.ElmExample(2, "<embedding>", "one two"),
    ]
    encoded = elm.encode_examples(loaded.tokenizer, examples)
    eos = loaded.tokenizer.eos_token_id
    for example, codes in zip(examples, encoded, strict=True):
        assert list(codes.target) == [*loaded.tokenizer(example.target)["input_ids"], eos]
    adapter = elm.EmbeddingAdapter.for_model(loaded, 4, n_soft=2, hidden=8)
    points = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    batch = elm.build_batch(loaded, encoded, elm.soft_tokens(adapter, points, [0, 1, 2]))
    scored = batch.labels != elm.IGNORE_INDEX
    assert scored.sum(1).tolist() == [len(codes.target) for codes in encoded]  # 2, 4, 3
    for row, codes in enumerate(encoded):
        assert batch.labels[row][scored[row]].tolist() == list(codes.target)

    # by hand from the full logits: mean NLL over the positions that predict a target token
    logits = loaded.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
    expected = []
    for row in range(3):
        positions = scored[row, 1:].nonzero()[:, 0]
        expected.append(-log_probs[row, positions, batch.labels[row, positions + 1]].mean())
    nll = elm.example_nll(loaded, batch)
    torch.testing.assert_close(nll, torch.stack(expected), rtol=1e-5, atol=1e-5)

    # no prediction at a prompt (or padding) position enters the loss: its gradient is exactly zero
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["states"] = output

    handle = loaded.parts.final_norm.register_forward_hook(keep)
    try:
        elm.example_nll(loaded, batch).sum().backward()
    finally:
        handle.remove()
    grads = captured["states"].grad.abs().sum(-1)  # (B, T)
    predicts_target = torch.zeros_like(scored)
    predicts_target[:, :-1] = scored[:, 1:]
    assert (grads[~predicts_target] == 0).all()
    assert (grads[predicts_target] > 0).all()

    # padding does not leak: each row alone gives the same loss
    for row in range(3):
        alone = elm.build_batch(loaded, encoded[row : row + 1], elm.soft_tokens(adapter, points, [row]))
        torch.testing.assert_close(elm.example_nll(loaded, alone)[0], nll[row], rtol=1e-5, atol=1e-6)


def test_the_tokenizers_bos_comes_first_and_only_there():
    tokenizer = tiny_tokenizer()
    assert not elm.adds_bos(tokenizer)
    assert elm.encode_example(tokenizer, PROMPT, "dog").before == tuple(tokenizer("the")["input_ids"])
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    assert elm.adds_bos(tokenizer)
    codes = elm.encode_example(tokenizer, "a <embedding> the", "dog")
    assert codes.before[0] == bos
    assert codes.row(2).count(bos) == 1
    assert codes.row(2) == [bos, *tokenizer("a", add_special_tokens=False)["input_ids"], -1, -1,
                            *tokenizer("the dog", add_special_tokens=False)["input_ids"],
                            tokenizer.eos_token_id]  # fmt: skip


def test_examples_and_their_order():
    with pytest.raises(ConfigError, match="exactly one"):
        elm.ElmExample(0, "no placeholder", "dog")
    with pytest.raises(ConfigError, match="exactly one"):
        elm.ElmExample(0, "<embedding> and <embedding>", "dog")
    tokenizer = tiny_tokenizer()
    targets = elm.leading_tokens(tokenizer, ["the dog saw a cat .", "one"], 3)
    assert targets == [" the dog saw", " one"]
    examples = elm.make_examples([4, 7], targets, PROMPT)
    assert [(e.embedding_index, e.target) for e in examples] == [(4, " the dog saw"), (7, " one")]
    # each epoch visits every example once; a step's batch depends on (seed, step) only
    orders = [elm.example_order(10, 3, step, 4) for step in range(5)]  # 20 positions: two epochs
    flat = [i for order in orders for i in order]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert elm.example_order(10, 3, 4, 4) == orders[4]
    assert elm.example_order(10, 4, 0, 4) != orders[0]


def test_shuffled_condition_never_keeps_an_examples_own_embedding():
    indices = [0, 0, 1, 2, 2, 2, 3, 4, 5, 5]  # several tasks may share a passage's embedding
    examples = [elm.ElmExample(i, PROMPT, "dog") for i in indices]
    for seed in range(50):
        rows = elm.condition_rows(examples, "shuffled", seed)
        assert all(row != own for row, own in zip(rows, indices, strict=True))
        assert sorted(set(rows)) == sorted(set(indices))
        assert rows == elm.condition_rows(examples, "shuffled", seed)
    assert elm.condition_rows(examples, "true") == indices
    assert elm.condition_rows(examples, "none") is None
    with pytest.raises(ConfigError, match="two different"):
        elm.shuffled_rows([3, 3, 3], 0)
    with pytest.raises(ConfigError, match="condition"):
        elm.condition_rows(examples, "swapped")


def test_the_none_condition_has_no_soft_token():
    loaded = _tiny()
    points, examples = _clusters(4)
    encoded = elm.encode_examples(loaded.tokenizer, examples)
    adapter = elm.EmbeddingAdapter.for_model(loaded, 16, n_soft=3, hidden=8)
    with_soft = elm.build_batch(loaded, encoded, elm.soft_tokens(adapter, points, [0, 1, 2, 3]))
    without = elm.build_batch(loaded, encoded, None)
    assert without.inputs_embeds.shape[1] == with_soft.inputs_embeds.shape[1] - 3
    assert (without.attention_mask.sum(1) == with_soft.attention_mask.sum(1) - 3).all()
    ids = torch.tensor([list(encoded[0].row(None))])
    torch.testing.assert_close(without.inputs_embeds[:1], loaded.parts.embed(ids))
    losses = elm.target_losses(loaded, None, None, examples, "none")
    assert losses.shape == (4,) and torch.isfinite(losses).all()


def test_a_learnable_task_beats_the_shuffled_and_no_embedding_controls():
    loaded = _tiny(init=0.2)
    points, examples = _clusters(120)
    train, heldout = examples[:96], examples[96:]
    adapter = elm.EmbeddingAdapter.for_model(loaded, 16, n_soft=2, hidden=64).standardise_inputs(points[:96])
    losses = elm.train_adapter(loaded, adapter, points, train, heldout, 60, 16, 1e-2, eval_every=30, progress=False)
    assert losses["step"].to_list() == list(range(61))
    assert losses["examples_seen"][-1] == 60 * 16
    curve = losses.drop_nulls("heldout_loss")
    assert curve["step"].to_list() == [0, 30, 60]
    assert curve["heldout_loss"][-1] < curve["heldout_loss"][0] - 2
    scores = {c: float(elm.target_losses(loaded, adapter, points, heldout, c, seed=1).mean()) for c in elm.CONDITIONS}
    assert scores["true"] == pytest.approx(curve["heldout_loss"][-1], rel=1e-5)
    assert scores["true"] + 2 < scores["shuffled"]
    assert scores["true"] + 2 < scores["none"]
    # the ELM names the cluster of held-out points, and stops at the EOS it was taught
    texts = elm.generate(loaded, adapter, points[96:104], PROMPT, max_new_tokens=4, batch_size=3)
    assert texts == [WORDS[i % 4] for i in range(96, 104)]
    # it takes any point: an interpolation's ends are the two points' words
    a, b = points[96], points[97]
    path = torch.stack([torch.lerp(a, b, t) for t in (0.0, 0.5, 1.0)])
    ends = elm.generate(loaded, adapter, path, PROMPT, max_new_tokens=4)
    assert ends[0] == WORDS[0] and ends[2] == WORDS[1]


def _greedy_without_cache(loaded, inputs, max_new_tokens):
    """Greedy decoding by recomputing the whole sequence at every step."""
    embeds, mask, positions = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
    tokens = []
    for _ in range(max_new_tokens):
        states = loaded.parts.body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)[0]
        token = elm.head_logits(loaded, states[:, -1]).argmax(-1)
        tokens.append(token)
        embeds = torch.cat([embeds, loaded.parts.embed(token[:, None])], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return torch.stack(tokens, 1).tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])  # gemma3: sliding-window layers (window 8) with a cache
def test_cached_generation_equals_recomputation_and_batching_changes_nothing(arch):
    loaded = _tiny(arch, init=0.2)
    adapter = elm.EmbeddingAdapter.for_model(loaded, 6, n_soft=2, hidden=16)
    points = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    prompts = [
        "the <embedding> is",
        "a very old and small <embedding> was by the big",
        "<embedding>",
        "one <embedding>",
    ]
    tokens = 12
    with torch.no_grad():
        inputs = elm.prompt_inputs(loaded, adapter, points, prompts)
        recomputed = _greedy_without_cache(loaded, inputs, tokens)
    cached = elm.generate(loaded, adapter, points, prompts, max_new_tokens=tokens, batch_size=4)
    assert cached == [_decode(loaded.tokenizer, row) for row in recomputed]
    assert len(set(cached)) > 1  # the rows really differ
    alone = [elm.generate(loaded, adapter, points[i : i + 1], prompts[i], tokens)[0] for i in range(4)]
    assert cached == alone
    assert elm.generate(loaded, adapter, points, prompts, tokens, batch_size=3) == cached
    none = elm.generate(loaded, None, None, "the dog", tokens)
    assert len(none) == 1 and none == elm.generate(loaded, None, None, ["the dog", "the dog"], tokens)[:1]


def test_save_and_load_round_trip_and_refuse_another_model(tmp_path):
    loaded = _tiny()
    points, _ = _clusters(6)
    adapter = elm.EmbeddingAdapter.for_model(loaded, 16, n_soft=2, hidden=32).standardise_inputs(points)
    path = tmp_path / "adapter.pt"
    elm.save_adapter(path, adapter, loaded, {"layer": 1, "task": "clusters"})
    restored, meta = elm.load_adapter(path, loaded)
    assert meta == {"layer": 1, "task": "clusters"}
    assert restored.config == adapter.config
    assert torch.equal(restored(points), adapter(points))
    assert elm.generate(loaded, restored, points, PROMPT, 5) == elm.generate(loaded, adapter, points, PROMPT, 5)
    assert elm.read_adapter_record(path)["d_model"] == loaded.d_model
    with pytest.raises(LatentAtlasError, match=r"d_model=64.*d_model=32"):
        elm.load_adapter(path, _tiny(d_model=32))
    with pytest.raises(LatentAtlasError, match="another model"):
        elm.load_adapter(path, _tiny(seed=1))
    with pytest.raises(LatentAtlasError, match="no ELM adapter"):
        elm.load_adapter(tmp_path / "missing.pt", loaded)


def test_mean_pooled_states_mask_padding_and_skip_the_first_position():
    judge = _tiny("gemma3", seed=5)
    texts = ["the dog saw a cat .", "one", "", "a small red house was by the river ."]
    pooled = elm.mean_pooled_states(judge, texts, layer=1, batch_size=4)
    assert pooled.shape == (4, judge.d_model)
    assert torch.isnan(pooled[2]).all() and torch.isfinite(pooled[[0, 1, 3]]).all()
    for row in (0, 1, 3):
        ids = judge.tokenizer(texts[row], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = judge.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        expected = hidden[1:].mean(0) if ids.shape[1] > 1 else hidden[0]
        torch.testing.assert_close(pooled[row], expected, rtol=1e-4, atol=1e-5)
    consistency = elm.semantic_consistency(pooled[[0, 1]], pooled[[0, 3]])
    assert consistency[0] == pytest.approx(1.0) and consistency[1] < 1
    assert torch.isnan(elm.semantic_consistency(pooled[[2]], pooled[[0]])).all()
