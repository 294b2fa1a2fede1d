"""The LoRA baseline on a tiny model: it learns a separable task, starts at the zero-shot reading, and leaves
the model exactly as it found it."""

import numpy as np
import pytest
import torch

from latent_atlas.errors import ConfigError
from latent_atlas.models import load_model
from latent_atlas.readers import lora

TEMPLATE = "{text} . it is a{label}"
LABEL_WORDS = (" dog", " city")
FILLER = ("the", "a", "old", "new", "small", "large", "red", "blue", "green", "was", "by")


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return load_model(tiny_model_dirs["llama"], device="cpu")


def _queries(tokenizer, n_per_class: int, seed: int) -> tuple[list[list[int]], torch.Tensor]:
    """Random filler followed by three words of the class's topic, rendered by the template (built here)."""
    rng = np.random.default_rng(seed)
    queries, classes = [], []
    for label, topic in enumerate((("dog", "cat"), ("house", "river", "city"))):
        for _ in range(n_per_class):
            words = [*rng.choice(FILLER, size=int(rng.integers(2, 6))), *rng.choice(topic, size=3)]
            prompt = TEMPLATE.replace("{text}", " ".join(words)).replace("{label}", "")
            queries.append(tokenizer(prompt)["input_ids"])
            classes.append(label)
    return queries, torch.tensor(classes)


def _label_ids(tokenizer) -> list[int]:
    return [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in LABEL_WORDS]


def test_lora_learns_a_separable_task(loaded):
    train, train_y = _queries(loaded.tokenizer, 16, seed=0)
    test, test_y = _queries(loaded.tokenizer, 8, seed=1)
    settings = lora.LoraSettings(rank=4, alpha=8, lr=1e-2, batch_size=8)
    untrained, _ = lora.train_and_predict(loaded, train, train_y, test, _label_ids(loaded.tokenizer), settings, 0, 0)
    assert (untrained == test_y).float().mean() <= 0.75  # the random model does not know the task
    predictions, losses = lora.train_and_predict(
        loaded, train, train_y, test, _label_ids(loaded.tokenizer), settings, 40, 0
    )
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert (predictions == test_y).float().mean() >= 0.9


def test_untrained_adapters_give_the_models_own_zero_shot_choice(loaded):
    queries, _ = _queries(loaded.tokenizer, 4, seed=2)
    ids = _label_ids(loaded.tokenizer)
    predictions, losses = lora.train_and_predict(
        loaded, queries, torch.zeros(len(queries), dtype=torch.long), queries, ids, lora.LoraSettings(), 0, 3
    )
    with torch.no_grad():
        expected = [int(loaded.model(torch.tensor([q])).logits[0, -1, ids].argmax()) for q in queries]
    assert losses == [] and predictions.tolist() == expected


def test_training_leaves_the_model_bit_identical(loaded):
    queries, classes = _queries(loaded.tokenizer, 4, seed=3)
    probe = torch.tensor([queries[0]])
    with torch.no_grad():
        before = loaded.model(probe).logits.clone()
    weights = {name: value.clone() for name, value in loaded.model.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in loaded.model.named_parameters()}
    mode = loaded.model.training
    settings = lora.LoraSettings(rank=2, alpha=4, lr=5e-2, batch_size=4)
    lora.train_and_predict(loaded, queries, classes, queries, _label_ids(loaded.tokenizer), settings, 3, 0)
    with torch.no_grad():
        after = loaded.model(probe).logits
    assert torch.equal(before, after)
    state = loaded.model.state_dict()
    assert set(state) == set(weights) and all(torch.equal(weights[name], state[name]) for name in weights)
    assert {name: p.requires_grad for name, p in loaded.model.named_parameters()} == flags
    assert loaded.model.training == mode
    assert not [name for name, _ in loaded.model.named_modules() if "lora" in name]


def test_adapters_are_the_configured_rank_and_modules(loaded):
    settings = lora.LoraSettings(rank=3, alpha=6, target_modules=("v_proj",))
    d = loaded.d_model
    n_layers = loaded.n_layers
    v_out = loaded.parts.layers[0].self_attn.v_proj.out_features
    with lora.lora_adapters(loaded.model, settings, seed=0) as wrapped:
        trainable = {name: p.shape for name, p in wrapped.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * n_layers and all("v_proj" in name for name in trainable)
    assert sum(s.numel() for s in trainable.values()) == n_layers * 3 * (d + v_out)


def test_a_missing_target_module_names_the_key(loaded):
    missing = lora.LoraSettings(target_modules=("no_such_proj",))
    with (
        pytest.raises(ConfigError, match=r"readers\.lora\.target_modules"),
        lora.lora_adapters(loaded.model, missing, seed=0),
    ):
        pass


def test_budget_in_examples():
    assert lora.LoraSettings(steps=7).budget_steps(100, 40) == 7
    assert lora.LoraSettings(batch_size=8).budget_steps(100, 40) == 500  # 40 epochs x 100 texts / 8
    assert lora.LoraSettings(batch_size=32).budget_steps(10, 3) == 1  # ceil(30 / 32)
    section = {"enabled": True, "seeds": [0], "rank": 2, "target_modules": ["q_proj"], "steps": None}
    assert lora.LoraSettings.from_config(section) == lora.LoraSettings(rank=2, target_modules=("q_proj",))
