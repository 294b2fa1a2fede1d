"""Steering: METHODS §10 checks 6 and 7, batched sweeps equal one-by-one runs, probes at chance when shuffled."""

import pytest
import torch

from latent_atlas.steering.generate import Decoding, continuation_log_probs, generate, off_target_kl
from latent_atlas.steering.interventions import HeadDirection, HeadShift, MlpShift, ResidualAddition, icv_shift
from latent_atlas.steering.vectors import (
    actadd_vector,
    fit_head_probes,
    icv_vectors,
    iti_heads,
    mean_difference_vector,
    optimise_vector,
    sentence_bleu,
    top_heads,
)
from latent_atlas.testing import TINY_ARCHITECTURES

TEXT = "the dog saw a cat and the cat saw the dog"


def _logits(loaded, intervention=None, rows=1):
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"].expand(rows, -1)
    with torch.no_grad():
        if intervention is None:
            return loaded.model(input_ids=ids).logits
        intervention.prompt_pass = True
        with intervention.attach(loaded.parts):
            return loaded.model(input_ids=ids).logits


def _interventions(loaded, coefficients):
    d, head_dim = loaded.d_model, loaded.d_model // loaded.model.config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    heads = [HeadDirection(1, 0, torch.randn(head_dim, generator=generator), 2.0)]
    return {
        "actadd": ResidualAddition(1, torch.randn(3, d, generator=generator), coefficients, positions="front"),
        "mean_difference": ResidualAddition(2, torch.randn(d, generator=generator), coefficients),
        "icv": MlpShift(torch.randn(loaded.n_layers, d, generator=generator), coefficients),
        "icv_residual": MlpShift(torch.randn(loaded.n_layers, d, generator=generator), coefficients, site="residual"),
        "iti": HeadShift(heads, head_dim, coefficients),
    }


def test_zero_strength_gives_the_unsteered_logits_bit_for_bit(tiny_loaded):
    unsteered = _logits(tiny_loaded)
    for name, intervention in _interventions(tiny_loaded, [0.0]).items():
        assert torch.equal(_logits(tiny_loaded, intervention), unsteered), name
    for name, intervention in _interventions(tiny_loaded, [2.0]).items():
        assert not torch.equal(_logits(tiny_loaded, intervention), unsteered), f"{name} changes nothing"


def test_actadd_is_sign_symmetric_and_identical_prompts_do_nothing(tiny_loaded):
    forward = actadd_vector(tiny_loaded, "a small red house", "the big dog", 1)
    backward = actadd_vector(tiny_loaded, "the big dog", "a small red house", 1)
    assert forward.shape[0] == 4  # the shorter prompt is padded to the longer one
    plus = _logits(tiny_loaded, ResidualAddition(1, forward, [3.0], positions="front"))
    minus = _logits(tiny_loaded, ResidualAddition(1, backward, [-3.0], positions="front"))
    assert torch.equal(plus, minus)
    same = actadd_vector(tiny_loaded, "the big dog", "the big dog", 1)
    assert torch.equal(_logits(tiny_loaded, ResidualAddition(1, same, [5.0], positions="front")), _logits(tiny_loaded))


def test_actadd_edits_the_prompt_pass_only(tiny_loaded):
    vector = torch.randn(2, tiny_loaded.d_model)
    addition = ResidualAddition(1, vector, [4.0], positions="front")
    addition.prompt_pass = False
    assert torch.equal(_logits_without_reset(tiny_loaded, addition), _logits(tiny_loaded))


def _logits_without_reset(loaded, intervention):
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), intervention.attach(loaded.parts):
        return loaded.model(input_ids=ids).logits


def test_icv_shift_preserves_every_norm():
    generator = torch.Generator().manual_seed(1)
    outputs = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64) * 7
    direction = torch.randn(16, generator=generator, dtype=torch.float64)
    strength = torch.tensor([0.0, 0.1, 2.0], dtype=torch.float64).reshape(-1, 1, 1)
    shifted = icv_shift(outputs, direction, strength)
    torch.testing.assert_close(shifted.norm(dim=-1), outputs.norm(dim=-1), rtol=1e-12, atol=0)
    assert torch.equal(shifted[0], outputs[0])
    moved = torch.nn.functional.cosine_similarity(shifted[2], direction, dim=-1)
    assert (moved > torch.nn.functional.cosine_similarity(outputs[2], direction, dim=-1)).all()


def test_icv_vectors_handle_identical_demonstrations(tiny_loaded):
    pairs = [["the dog", "a cat"], ["the house", "a river"], ["one day", "the night"]]
    vectors = icv_vectors(tiny_loaded, pairs)
    assert vectors.shape == (tiny_loaded.n_layers, tiny_loaded.d_model) and torch.isfinite(vectors).all()
    assert torch.equal(icv_vectors(tiny_loaded, pairs), vectors)  # deterministic
    same = icv_vectors(tiny_loaded, [["the dog", "the dog"], ["a cat", "a cat"]])
    assert torch.equal(same, torch.zeros_like(same))  # x = y: ΔH = 0, no NaN


def test_mean_difference_is_antisymmetric(tiny_loaded):
    pairs = [["the dog saw", "the cat saw"], ["a red house", "a blue house"]]
    flipped = [[b, a] for a, b in pairs]
    torch.testing.assert_close(
        mean_difference_vector(tiny_loaded, pairs, 2), -mean_difference_vector(tiny_loaded, flipped, 2)
    )


@pytest.mark.parametrize("decoding", [Decoding("greedy"), Decoding("sampled", temperature=1.0, top_p=0.9)])
def test_a_batched_sweep_equals_the_same_settings_one_by_one(tiny_loaded, decoding):
    coefficients = [0.0, 1.0, 4.0]
    for name, intervention in _interventions(tiny_loaded, coefficients).items():
        batched = generate(tiny_loaded, "the dog saw", intervention, 3, 6, decoding, row_seeds=[7, 7, 7])
        for row, coefficient in enumerate(coefficients):
            alone = generate(
                tiny_loaded, "the dog saw", intervention.with_coefficients([coefficient]), 1, 6, decoding, [7]
            )
            assert torch.equal(batched[row], alone[0]), (name, coefficient)
    unsteered = generate(tiny_loaded, "the dog saw", None, 1, 6, decoding, row_seeds=[7])
    zero = generate(tiny_loaded, "the dog saw", _interventions(tiny_loaded, [0.0])["actadd"], 1, 6, decoding, [7])
    assert torch.equal(unsteered, zero)


def test_continuation_scores_and_off_target_kl(tiny_loaded):
    prompt = tiny_loaded.tokenizer("the dog")["input_ids"]
    continuation = tiny_loaded.tokenizer("saw a cat", add_special_tokens=False)["input_ids"]
    scored = continuation_log_probs(tiny_loaded, prompt, [continuation, continuation[:1]])
    ids = torch.tensor([[*prompt, *continuation]])
    with torch.no_grad():
        full = torch.log_softmax(tiny_loaded.model(input_ids=ids).logits[0].float(), -1)
    expected = full[len(prompt) - 1 : -1].gather(-1, torch.tensor(continuation)[:, None])[:, 0]
    torch.testing.assert_close(scored[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scored[1], expected[:1], atol=1e-5, rtol=0)  # padding does not leak
    vector = torch.randn(
        tiny_loaded.d_model, generator=torch.Generator().manual_seed(0)
    )  # not constant: LayerNorm centres
    kl = off_target_kl(tiny_loaded, [TEXT], ResidualAddition(1, vector, [0.0, 3.0]), 2)
    assert kl[0] < 1e-6 < kl[1]


def test_shuffled_label_probes_sit_at_chance():
    generator = torch.Generator().manual_seed(0)
    n, layers, heads, head_dim = 400, 2, 3, 8
    labels = (torch.randperm(n, generator=generator) % 2).float()
    activations = torch.randn(n, layers, heads, head_dim, generator=generator)
    activations[:, 1, 2, 0] += 3 * (labels * 2 - 1)  # one head encodes the label
    train = torch.randperm(n, generator=generator) % 4 != 0
    probes = fit_head_probes(activations[train], labels[train])
    accuracy = probes.accuracy(activations[~train], labels[~train])
    assert accuracy[1, 2] > 0.9
    assert accuracy.flatten().sort().values[:-1].max() < 0.7
    assert abs(float(probes.accuracy(activations[~train], labels[~train], shuffled=True).mean()) - 0.5) < 0.08
    best = iti_heads(activations[train], labels[train], top_heads(accuracy, k=1))[0]
    assert (best.layer, best.head) == (2, 2) and best.direction[0] > 0.9 and best.std > 0


def test_an_optimised_vector_reproduces_its_target(tiny_model_dirs):
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    with torch.no_grad():  # initialisation scale 0.02 makes outputs almost input-blind; 0.3 does not
        for parameter in loaded.model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(15)
    result = optimise_vector(loaded, "the dog saw a red house", layer=1, steps=300, learning_rate=0.3)
    target = loaded.tokenizer("the dog saw a red house", add_special_tokens=False)["input_ids"]
    assert result.exact and result.recovered == target, (result.steps, result.losses[-1])
    assert result.steps < 300 and result.losses[-1] < result.losses[0]
    assert sentence_bleu(target, result.recovered) == pytest.approx(100.0)


def test_sentence_bleu():
    assert sentence_bleu([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(100.0)
    assert sentence_bleu([1, 2, 3, 4, 5], [6, 7, 8]) == 0.0
    assert 0 < sentence_bleu([1, 2, 3, 4, 5], [1, 2, 3, 9, 5]) < 100


def test_head_activations_do_not_depend_on_batching(tiny_loaded):
    from latent_atlas.steering.vectors import head_activations

    head_dim = getattr(tiny_loaded.model.config, "head_dim", None) or tiny_loaded.d_model // 4
    texts = ["the dog saw a cat .", "a house", "one day the light came and the water was blue"]
    batched = head_activations(tiny_loaded, texts, head_dim, batch_size=3)
    alone = head_activations(tiny_loaded, texts, head_dim, batch_size=1)
    assert batched.shape == (3, tiny_loaded.n_layers, 4, head_dim)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


STEERING_DATA = """
actadd: {positive: "the dog", negative: "a cat"}
contrast_pairs: [["the dog was good", "the dog was bad"], ["a happy day", "a sad day"]]
icv_demonstrations: [["the day was bad", "the day was good"], ["it was sad", "it was happy"]]
neutral_prompts: ["the house was", "one day they"]
off_target_texts: ["the water was blue and the light came"]
target_sentences: ["the dog saw"]
"""


@pytest.fixture(scope="module")
def steering_setup(tiny_model_dirs, tmp_path_factory):
    from latent_atlas.extract import ExtractionSettings, extract_activations
    from latent_atlas.models import load_model
    from latent_atlas.steering.data import load_steering_data
    from tests.conftest import STORE_ATTRS
    from tests.unit.test_lenses import _random_corpus

    root = tmp_path_factory.mktemp("steering")
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    extract_activations(loaded, _random_corpus(30), root / "s.h5", ExtractionSettings(device="cpu"), STORE_ATTRS, False)
    (root / "data.yaml").write_text(STEERING_DATA)
    words = ["the dog", "a cat", "the house", "the river", "the city", "the world", "the water", "the light"]
    places = ["one", "two", "three"]
    rows = [f"{word},{places[i % 3]}" for i, word in enumerate(words * 2)]
    (root / "facts.csv").write_text("city,country\n" + "\n".join(rows) + "\n")
    return loaded, root, load_steering_data(root / "data.yaml")


def test_a_sweep_table_has_every_setting_and_an_exact_baseline(steering_setup):
    import polars as pl

    from latent_atlas.steering.pipeline import sweep
    from latent_atlas.store import ActivationStore

    loaded, root, data = steering_setup
    section = {"layers": [1, 2], "max_new_tokens": 4, "actadd": {"coefficients": [0, 4]}}
    with ActivationStore(root / "s.h5") as store:
        table = sweep(loaded, "actadd", data, section, store)
    assert table.height == 2 * 2 * 2 * 2  # layers x prompts x (greedy, sampled) x strengths
    baseline = table.filter(pl.col("coefficient") == 0)
    assert (baseline["relative_norm"] == 0).all() and (baseline["off_target_kl"] < 1e-6).all()
    assert (table.filter(pl.col("coefficient") == 4)["relative_norm"] > 0).all()
    start = loaded.tokenizer.convert_tokens_to_ids("<bos>")  # ActAdd prompts follow the model's start token
    unsteered = generate(loaded, [start, *loaded.tokenizer("the house was")["input_ids"]], None, 1, 4)[0].tolist()
    first = baseline.filter(pl.col("prompt_id") == 0, pl.col("decoding") == "greedy", pl.col("layer") == 1)
    assert first["continuation"][0] == loaded.tokenizer.decode(unsteered, skip_special_tokens=True)
    assert table["sentiment"].is_between(-1, 1).all() and (table["perplexity"] > 0).all()
    assert set(table["prefix"]) == {"<bos>"}  # the resolved steering.prefix, recorded per row
    with ActivationStore(root / "s.h5") as store:
        assert sweep(loaded, "actadd", data, section, store).equals(table)  # same config and seed, same table


def test_the_generation_methods_share_one_unsteered_baseline(steering_setup):
    """steering.prefix goes before every method's prompts: strength 0 continues identically for all three."""
    import polars as pl

    from latent_atlas.steering.pipeline import sweep
    from latent_atlas.store import ActivationStore

    loaded, root, data = steering_setup
    section = {
        "layers": [1],
        "max_new_tokens": 4,
        "decodings": ["greedy"],
        "actadd": {"coefficients": [0, 4]},
        "mean_difference": {"coefficients": [0, 4]},
        "icv": {"coefficients": [0, 0.1]},
    }
    start = loaded.tokenizer.convert_tokens_to_ids("<bos>")
    with ActivationStore(root / "s.h5") as store:
        tables = {
            method: sweep(loaded, method, data, section, store) for method in ("actadd", "mean_difference", "icv")
        }
    for prompt_id, prompt in enumerate(data.neutral_prompts[:2]):
        ids = [start, *loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        expected = loaded.tokenizer.decode(generate(loaded, ids, None, 1, 4)[0].tolist(), skip_special_tokens=True)
        for method, table in tables.items():
            row = table.filter(pl.col("coefficient") == 0, pl.col("prompt_id") == prompt_id)
            assert row["continuation"].to_list() == [expected], method
            assert set(table["prefix"]) == {"<bos>"}, method


def test_iti_run_and_truth_scoring_at_zero_strength(steering_setup):
    import numpy as np

    from latent_atlas.steering.data import city_statements
    from latent_atlas.steering.pipeline import run_iti
    from latent_atlas.store import ActivationStore

    loaded, root, data = steering_setup
    statements = city_statements(root / "facts.csv", train_fraction=0.4, validation_fraction=0.2, seed=0)
    assert (statements.split == "test").sum() == 6 and len(statements.texts()) == 32  # 3 of 8 cities, twice each
    assert all(true != false for true, false in zip(statements.true_objects, statements.false_objects, strict=True))
    section = {"iti": {"strengths": [0, 10], "heads": 3}}
    with ActivationStore(root / "s.h5") as store:
        table, probes = run_iti(loaded, statements, data, section, store)
    assert probes.height == loaded.n_layers * 4 and probes["selected"].sum() == 3
    held_out = np.flatnonzero(statements.split == "test")
    margins = []
    for item in held_out:  # strength 0 must score exactly like the unsteered model
        prompt = loaded.tokenizer(statements.prompts[item])["input_ids"]
        ids = [loaded.tokenizer(f" {o}", add_special_tokens=False)["input_ids"]
               for o in (statements.true_objects[item], statements.false_objects[item])]  # fmt: skip
        true, false = continuation_log_probs(loaded, prompt, ids)
        margins.append(float(true.sum() - false.sum()))
    baseline = table.filter(table["coefficient"] == 0)
    assert baseline["test_truth_accuracy"][0] == pytest.approx(np.mean(np.array(margins) > 0))
    assert baseline["test_mean_log_prob_margin"][0] == pytest.approx(np.mean(margins), abs=1e-4)
    assert baseline["test_items"][0] == len(held_out)


def test_steering_figures_are_drawn(steering_setup, tmp_path):
    import polars as pl

    from latent_atlas.plots.steering import plot_effect, plot_examples, plot_frontier, plot_iti
    from latent_atlas.steering.pipeline import sweep
    from latent_atlas.store import ActivationStore

    loaded, root, data = steering_setup
    section = {"layers": [1], "max_new_tokens": 3, "decodings": ["greedy"], "mean_difference": {"coefficients": [0, 2]}}
    with ActivationStore(root / "s.h5") as store:
        table = sweep(loaded, "mean_difference", data, section, store)
    probes = pl.DataFrame({"layer": [1, 1, 2, 2], "head": [0, 1, 0, 1], "test_accuracy": [0.5, 0.9, 0.6, 0.7],
                           "shuffled_test_accuracy": [0.5] * 4, "selected": [False, True, False, False],
                           "validation_statements": [4] * 4, "test_statements": [16] * 4})  # fmt: skip
    iti = pl.DataFrame({"coefficient": [0.0, 5.0], "test_truth_accuracy": [0.6, 0.7], "off_target_kl": [0.0, 0.1],
                        "heads": [1, 1], "test_items": [8, 8]})  # fmt: skip
    optimised = pl.DataFrame({"layer": [1], "target": ["the dog"], "recovered": ["the dog"], "exact_match": [True],
                              "bleu": [100.0]})  # fmt: skip
    for name, draw in {
        "effect": lambda p, q: plot_effect(table, p, q, "tiny"),
        "frontier": lambda p, q: plot_frontier(table, p, q, "tiny"),
        "iti": lambda p, q: plot_iti(iti, probes, p, q, "tiny"),
        "examples": lambda p, q: plot_examples(table, optimised, p, q, "tiny"),
    }.items():
        draw(tmp_path / f"{name}.pdf", tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name


def test_typical_norms_fall_back_to_the_nearest_stored_layer(tmp_path):
    from latent_atlas.neighbourhood.knn import typical_norm
    from latent_atlas.steering.pipeline import typical_norms
    from latent_atlas.store import ActivationStore
    from tests.unit.test_neighbourhood import _synthetic_store

    _synthetic_store(tmp_path / "s.h5")  # stores resid.01 only
    with ActivationStore(tmp_path / "s.h5") as store:
        norms = typical_norms(store, [1, 3, 7])
        assert norms == {layer: typical_norm(store, 1) for layer in (1, 3, 7)}


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_bfloat16(request, tiny_model_dirs):
    """A tiny model computing in bfloat16 on the CPU (what ``steering.model_dtype: auto`` gives on a GPU)."""
    from latent_atlas.models import load_model

    return load_model(tiny_model_dirs[request.param], device="cpu", dtype="bfloat16")


def test_in_bfloat16_zero_strength_is_the_unsteered_bfloat16_model_bit_for_bit(tiny_bfloat16):
    unsteered = _logits(tiny_bfloat16)
    assert tiny_bfloat16.dtype == "bfloat16" and unsteered.dtype == torch.bfloat16
    for name, intervention in _interventions(tiny_bfloat16, [0.0]).items():
        assert torch.equal(_logits(tiny_bfloat16, intervention), unsteered), name
    for name, intervention in _interventions(tiny_bfloat16, [2.0]).items():
        assert not torch.equal(_logits(tiny_bfloat16, intervention), unsteered), f"{name} changes nothing"
    for name, intervention in _interventions(tiny_bfloat16, [0.0, 4.0]).items():  # a sweep's batch
        batched = _logits(tiny_bfloat16, intervention, rows=2)
        assert torch.equal(batched[0], _logits(tiny_bfloat16, rows=2)[0]), name
        assert not torch.equal(batched[1], batched[0]), name
    zero = _interventions(tiny_bfloat16, [0.0])["actadd"]
    for decoding in (Decoding("greedy"), Decoding("sampled")):
        unsteered_tokens = generate(tiny_bfloat16, "the dog saw", None, 1, 6, decoding, [7])
        assert torch.equal(generate(tiny_bfloat16, "the dog saw", zero, 1, 6, decoding, [7]), unsteered_tokens)


def test_a_bfloat16_sweep_keeps_an_exact_baseline_and_records_its_dtype(steering_setup, tiny_model_dirs):
    import polars as pl

    from latent_atlas.models import load_model
    from latent_atlas.steering.pipeline import steering_provenance, sweep
    from latent_atlas.store import ActivationStore

    _, root, data = steering_setup  # the store was extracted in float32: only the typical norms come from it
    loaded = load_model(tiny_model_dirs["llama"], device="cpu", dtype="bfloat16")
    section = {"layers": [1], "max_new_tokens": 4, "actadd": {"coefficients": [0, 4]}}
    with ActivationStore(root / "s.h5") as store:
        table = sweep(loaded, "actadd", data, section, store)
    baseline = table.filter(pl.col("coefficient") == 0)
    assert (baseline["relative_norm"] == 0).all() and (baseline["off_target_kl"] < 1e-6).all()
    steered = table.filter(pl.col("coefficient") == 4)
    assert (steered["off_target_kl"] > 0).all() and (steered["relative_norm"] > 0).all()
    start = loaded.tokenizer.convert_tokens_to_ids("<bos>")  # ActAdd prompts follow the model's start token
    unsteered = generate(loaded, [start, *loaded.tokenizer("the house was")["input_ids"]], None, 1, 4)[0].tolist()
    first = baseline.filter(pl.col("prompt_id") == 0, pl.col("decoding") == "greedy")
    assert first["continuation"][0] == loaded.tokenizer.decode(unsteered, skip_special_tokens=True)
    meta = steering_provenance(loaded, "tiny", section, "actadd", str(root / "data.yaml"), "s.h5")
    assert (meta["model_dtype"], meta["device"]) == ("bfloat16", "cpu")
