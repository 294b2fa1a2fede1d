"""Semantic clustering reader and its baselines (METHODS §4): bases, module, training, scores, kNN, probe, ICL."""

import pytest
import torch
from torch.nn import functional

from latent_atlas.architectures import LogitTransform
from latent_atlas.errors import ConfigError
from latent_atlas.lenses import SemanticBasisLens, Unembed
from latent_atlas.readers.baselines import (
    _shared_prefix_length,
    choose_demonstrations,
    icl_predict,
    kl_to_anchors,
    knn_prompting,
    linear_probe,
    render_example,
    zero_shot_from_states,
)
from latent_atlas.readers.clustering import (
    LabelledSplit,
    SemanticClusteringModule,
    classification_scores,
    cosine_scores,
    label_token_ids,
    predict_with_bases,
    semantic_bases,
    train_clustering,
)
from latent_atlas.testing import tiny_tokenizer

TEXTS = [
    "the dog saw the cat and the cat saw the dog",
    "a small red house was by the river",
    "people said the world was old",
    "one day the light came",
    "two dogs went to the house at night",
    "the water was blue",
]


def _split(train_x, train_y, test_x, test_y, n_classes):
    return LabelledSplit(
        labels=tuple(f"c{i}" for i in range(n_classes)),
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        train_ids=tuple(f"r{i}" for i in range(len(train_y))),
        test_ids=tuple(f"t{i}" for i in range(len(test_y))),
    )


def _clusters(n_per_class, n_classes, d, seed, noise=0.6):
    """Gaussian clusters around random centres (unrelated to any basis): labels are only learnable."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[y] + noise * torch.randn(len(y), d, generator=generator), y


@pytest.fixture(scope="module")
def synthetic():
    """A 3-class clustering task on a random head with V=40, d=24."""
    head = torch.randn(40, 24, generator=torch.Generator().manual_seed(5))
    train_x, train_y = _clusters(40, 3, 24, seed=1)
    test_x, test_y = _clusters(30, 3, 24, seed=2)
    return head, _split(train_x, train_y, test_x, test_y, 3), [3, 17, 29]


# ---- labelled split, label words ------------------------------------------------------------------


def test_split_hash_depends_on_the_ids_only_and_split_is_validated():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    split = _split(x, y, x[:2], y[:2], 2)
    shuffled = LabelledSplit(split.labels, x.flip(0), y.flip(0), x[:2], y[:2], split.train_ids[::-1], split.test_ids)
    assert split.split_hash == shuffled.split_hash and len(split.split_hash) == 16
    assert split.split_hash != _split(x[:3], y[:3], x[:2], y[:2], 2).split_hash
    with pytest.raises(ValueError, match=r"0\.\.1"):
        _split(x, torch.tensor([0, 1, 2, 1]), x, y, 2)
    with pytest.raises(ValueError, match="width"):
        _split(x, y, torch.randn(4, 5), y, 2)
    with pytest.raises(ValueError, match="both train and test"):
        LabelledSplit(("a", "b"), x, y, x, y, ("1", "2", "3", "4"), ("4", "5", "6", "7"))


def test_label_token_ids_takes_first_tokens_and_names_the_config_key():
    tokenizer = tiny_tokenizer()
    ids = label_token_ids(tokenizer, {"animal": " dog", "place": " city", "colour": " red house"}, "topic")
    assert ids == [tokenizer.convert_tokens_to_ids(w) for w in ("dog", "city", "red")]
    with pytest.raises(ConfigError, match=r"readers\.tasks\.topic\.label_words"):
        label_token_ids(tokenizer, {"a": " dog", "b": " dog house"}, "topic")
    with pytest.raises(ConfigError, match=r"readers\.tasks\.topic\.label_words\.b"):
        label_token_ids(tokenizer, {"a": " dog", "b": ""}, "topic")


# ---- bases and the module -------------------------------------------------------------------------


def test_identity_module_reproduces_the_semantic_basis_lens(tiny_loaded):
    unembed = Unembed.from_parts(tiny_loaded.parts)
    h = 3 * torch.randn(7, tiny_loaded.d_model, generator=torch.Generator().manual_seed(0))
    bases = semantic_bases(unembed.weight)
    expected = SemanticBasisLens(unembed, temperature=1.0).logits(h, tiny_loaded.n_layers)
    with torch.no_grad():
        r = unembed.final_norm(h)
    for module in (None, torch.nn.Identity()):
        torch.testing.assert_close(cosine_scores(module, r, bases.unit), expected, atol=1e-5, rtol=0)
    assert bases.rank == tiny_loaded.d_model and bases.condition_number >= 1


def test_module_parameter_count_and_shapes():
    d, reduction = 64, 16
    module = SemanticClusteringModule(d, reduction)
    h = d // reduction
    count = sum(p.numel() for p in module.parameters())
    assert count == 4 * d * d + 3 * d + 2 * d * h + h + d + 2 * d  # MLP, bottleneck, LayerNorm
    assert abs(count / (33 / 8 * d * d) - 1) < 0.03
    single = torch.randn(5, d)
    assert module(single).shape == (5, d)
    # one position: pooling is the identity, so (n, d) and (n, 1, d) agree
    torch.testing.assert_close(module(single[:, None])[:, 0], module(single))
    assert module(torch.randn(5, 3, d)).shape == (5, 3, d)


# ---- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["all_bases", "gt_only"])
def test_training_learns_a_separable_task(synthetic, variant):
    head, split, ids = synthetic
    bases = semantic_bases(head)
    module, log = train_clustering(
        split, bases.unit, variant, ids, epochs=12, lr=3e-3, batch_size=32, temperature=0.05, seed=0, reduction=4
    )
    trained = classification_scores(split.test_y, predict_with_bases(module, split.test_x, bases.rows(ids)), 3)
    assert trained["balanced_accuracy"] > 0.85
    assert log.height == 12 and log["loss"][-1] < 0.5 * log["loss"][0]


def test_gt_only_accepts_label_bases_directly(synthetic):
    head, split, ids = synthetic
    bases = semantic_bases(head)
    settings = {"epochs": 2, "batch_size": 16, "seed": 3, "reduction": 4}
    via_ids, _ = train_clustering(split, bases.unit, "gt_only", ids, **settings)
    direct, _ = train_clustering(split, bases.rows(ids), "gt_only", None, **settings)
    whole, _ = train_clustering(split, bases, "gt_only", ids, **settings)  # SemanticBases itself
    for a, b, c in zip(*(m.state_dict().values() for m in (via_ids, direct, whole)), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(bases[ids], bases.unit[ids])
    with pytest.raises(ValueError, match="label bases"):
        train_clustering(split, bases.rows(ids), "all_bases", None)


def test_training_is_deterministic_given_the_seed(synthetic):
    head, split, ids = synthetic
    unit = semantic_bases(head).unit
    settings = {"epochs": 2, "batch_size": 16, "reduction": 4}
    a, log_a = train_clustering(split, unit, "all_bases", ids, seed=7, **settings)
    b, log_b = train_clustering(split, unit, "all_bases", ids, seed=7, **settings)
    c, _ = train_clustering(split, unit, "all_bases", ids, seed=8, **settings)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["mlp.0.weight"], state_c["mlp.0.weight"])
    assert log_a.equals(log_b)


# ---- scores ---------------------------------------------------------------------------------------


def test_classification_scores_on_hand_computed_examples():
    # class 3 is neither true nor predicted (left out of macro-F1); class 2 is true but never predicted
    scores = classification_scores([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], n_classes=4)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    # class 1 is predicted but never true: it counts with F1 0 in macro-F1, not in balanced accuracy
    scores = classification_scores(torch.tensor([0, 0]), torch.tensor([0, 1]), n_classes=2)
    assert scores["balanced_accuracy"] == pytest.approx(1 / 2)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert classification_scores([1, 0], [1, 0], 2) == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0}


# ---- baselines on cached states -------------------------------------------------------------------


def test_zero_shot_from_states_is_the_models_own_choice(tiny_loaded):
    tokenizer, model = tiny_loaded.tokenizer, tiny_loaded.model
    ids = label_token_ids(tokenizer, {"a": " dog", "b": " cat", "c": " river", "d": " light"}, "t")
    states, expected = [], []
    with torch.no_grad():
        for text in TEXTS:
            encoded = tokenizer(text, return_tensors="pt")
            out = model(**encoded, output_hidden_states=True)
            states.append(out.hidden_states[-1][0, -1])  # the LM-head input: post-final-norm
            expected.append(int(out.logits[0, -1, ids].argmax()))
    predicted = zero_shot_from_states(torch.stack(states), model.get_output_embeddings().weight, ids)
    assert predicted.tolist() == expected


def test_knn_prompting_k1_on_the_training_set_returns_its_labels():
    head = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    x = 2 * torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(2))
    split = _split(x, y, x.clone(), y.clone(), 3)
    assert torch.equal(knn_prompting(split, head, k=1, vocab_chunk=7), y)


def test_knn_prompting_reads_the_model_s_soft_capped_distribution() -> None:
    """With Gemma 2's soft-cap the features are softmax(c·tanh(z / c)), not softmax(z)."""
    generator = torch.Generator().manual_seed(3)
    head, bias = 10 * torch.randn(30, 6, generator=generator), torch.randn(30, generator=generator)
    train_x, test_x = 2 * torch.randn(12, 6, generator=generator), 2 * torch.randn(9, 6, generator=generator)
    cap = 5.0

    def capped(x: torch.Tensor) -> torch.Tensor:
        z = x.double() @ head.double().T + bias.double()
        return functional.log_softmax(cap * torch.tanh(z / cap), dim=-1)

    log_a, log_t = capped(train_x), capped(test_x)
    direct = (log_a.exp()[None] * (log_a[None] - log_t[:, None])).sum(-1)
    transform = LogitTransform(softcap=cap)
    found = kl_to_anchors(train_x, test_x, head, bias=bias, transform=transform, vocab_chunk=8)
    torch.testing.assert_close(found, direct)
    assert (found - kl_to_anchors(train_x, test_x, head, bias=bias, vocab_chunk=8)).abs().max() > 0.1


def test_knn_prompting_matches_a_direct_kl_and_breaks_ties_by_the_nearest():
    head, bias = torch.randn(30, 6), torch.randn(30)
    train_x, test_x = 2 * torch.randn(12, 6), 2 * torch.randn(9, 6)
    train_y = torch.tensor([0, 1] * 6)
    log_a = functional.log_softmax(train_x.double() @ head.double().T + bias.double(), dim=-1)
    log_t = functional.log_softmax(test_x.double() @ head.double().T + bias.double(), dim=-1)
    direct = (log_a.exp()[None] * (log_a[None] - log_t[:, None])).sum(-1)  # KL(anchor ‖ test)
    torch.testing.assert_close(kl_to_anchors(train_x, test_x, head, bias=bias, vocab_chunk=8), direct)
    split = _split(train_x, train_y, test_x, torch.zeros(9, dtype=torch.long), 2)
    nearest_two = direct.topk(2, largest=False).indices
    # with k=2 every 1-1 tie goes to the nearest anchor's class
    expected = train_y[nearest_two[:, 0]]
    assert torch.equal(knn_prompting(split, head, k=2, bias=bias), expected)


def test_linear_probe_fits_a_linearly_separable_set():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(90, 8, generator=generator)
    y = (x @ torch.randn(8, 3, generator=generator)).argmax(1)  # separable by construction
    split = _split(x, y, x.clone(), y.clone(), 3)
    assert torch.equal(linear_probe(split, weight_decay=1e-6, max_iter=100), y)


# ---- in-context learning --------------------------------------------------------------------------

TEMPLATE = "{text} . it is{label} !"
LABEL_WORDS = [" dog", " cat", " river"]


def test_choose_demonstrations_is_balanced_and_seeded():
    y = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    chosen = choose_demonstrations(y, 2, seed=0)
    assert sorted(y[i] for i in chosen) == [0, 0, 1, 1, 2, 2] and len(set(chosen)) == 6
    assert chosen == choose_demonstrations(y, 2, seed=0)
    assert any(choose_demonstrations(y, 2, seed=s) != chosen for s in range(1, 5))
    with pytest.raises(ValueError, match="fewer"):
        choose_demonstrations(y, 4, seed=0)


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert _shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert _shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert _shared_prefix_length([[7, 8, 9]]) == 2
    assert _shared_prefix_length([[1], [2, 3]]) == 0


def test_render_example():
    assert render_example("{text}\nType:{label}\n", "a b", " dog") == "a b\nType: dog\n"
    assert render_example("{text}\nType:{label}\n", "a {b}", "") == "a {b}\nType:"


def _full_prompt_scores(loaded, prompt, ids):
    encoded = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**encoded).logits[0, -1, ids]


def test_icl_cached_batched_prompts_equal_full_forward_passes(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    ids = label_token_ids(tokenizer, {str(i): w for i, w in enumerate(LABEL_WORDS)}, "t")
    demonstrations = [(TEXTS[0], 1), (TEXTS[1], 2), (TEXTS[4], 0)]
    tests = [TEXTS[2], TEXTS[3], TEXTS[5], TEXTS[0] + " and the city was new", "the cat"]
    settings = {"template": TEMPLATE, "separator": " . ", "max_tokens": 9}
    predictions, scores = icl_predict(
        tiny_loaded.model, tokenizer, demonstrations, tests, LABEL_WORDS, batch_size=3, **settings
    )
    cut = [" ".join(t.split()[:9]) for t in (d for d, _ in demonstrations)]
    prefix = " . ".join(f"{c} . it is{LABEL_WORDS[label]} !" for c, (_, label) in zip(cut, demonstrations, strict=True))
    expected = torch.stack(
        [_full_prompt_scores(tiny_loaded, f"{prefix} . {' '.join(t.split()[:9])} . it is", ids) for t in tests]
    )
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert torch.equal(predictions, expected.argmax(1))
    # padding changes nothing: one example per batch gives the same logits
    _, alone = icl_predict(tiny_loaded.model, tokenizer, demonstrations, tests, LABEL_WORDS, batch_size=1, **settings)
    torch.testing.assert_close(alone, scores, atol=1e-5, rtol=0)
    # no demonstrations: the prompted zero-shot reading of the template
    _, zero = icl_predict(tiny_loaded.model, tokenizer, [], tests[:2], LABEL_WORDS, batch_size=2, **settings)
    expected_zero = torch.stack([_full_prompt_scores(tiny_loaded, f"{t} . it is", ids) for t in tests[:2]])
    torch.testing.assert_close(zero, expected_zero, atol=1e-5, rtol=0)
