"""Readout rescaling (Steck et al.; METHODS §8.7, sanity check 12): γ moves into W_U, logits stay, cosines move."""

import numpy as np
import pytest
import torch

from latent_atlas.geometry.readout import mean_pair_cosine, neighbour_overlap, norm_gain, readout_rescaling
from latent_atlas.models import load_model
from tests.conftest import SENTENCES

# How each tiny architecture's final norm turns its ``weight`` into the gain γ.
GAIN_OF_WEIGHT = {"llama": lambda w: w, "gemma3": lambda w: 1 + w}
WEIGHT_OF_GAIN = {"llama": lambda g: g, "gemma3": lambda g: g - 1}


def _random_gain(d: int, seed: int = 0) -> torch.Tensor:
    """A log-normal gain: far from uniform, every entry well away from zero (≈ 0.15 … 7)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.exp(0.6 * torch.randn(d, generator=generator))


def _set_gain(loaded, arch: str, gain: torch.Tensor) -> None:
    with torch.no_grad():
        loaded.parts.final_norm.weight.copy_(WEIGHT_OF_GAIN[arch](gain))


def _anisotropic_unembedding(loaded, seed: int = 1) -> None:
    """Give the rows of W_U a shared non-uniform offset, so that their mean cosine is large and γ can move it.

    (Isotropic random rows have mean cosine ≈ 0 under every diagonal rescaling: the check would be vacuous.)
    """
    generator = torch.Generator().manual_seed(seed)
    weight = loaded.parts.lm_head.weight
    offset = weight.std() * torch.randn(weight.shape[1], generator=generator)
    with torch.no_grad():
        weight.add_(offset)


def _values(table) -> dict[str, float]:
    return dict(zip(table["quantity"].to_list(), table["value"].to_list(), strict=True))


def _norm_input_and_logits(loaded, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm's input and the model's own logits, from one full forward pass."""
    captured = []
    hook = loaded.parts.final_norm.register_forward_hook(lambda _m, args, _out: captured.append(args[0][0]))
    try:
        with torch.no_grad():
            logits = loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits[0]
    finally:
        hook.remove()
    return captured[0], logits


# --------------------------------------------------------------------------------------------------
# norm_gain


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_norm_gain_of_an_rms_norm_is_its_effective_gain(tiny_model_dirs, arch):
    loaded = load_model(tiny_model_dirs[arch], device="cpu")
    norm, d = loaded.parts.final_norm, loaded.d_model
    gain = _random_gain(d)
    _set_gain(loaded, arch, gain)
    assert gain.min() > 0.1
    measured, bias = norm_gain(norm, d)
    expected = GAIN_OF_WEIGHT[arch](norm.weight.detach())
    torch.testing.assert_close(measured, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(measured, gain, atol=1e-6, rtol=0)
    assert torch.equal(bias, torch.zeros(d))
    # and it is the gain of the norm's own formula on any input: norm(x) = γ ⊙ x / rms(x)
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(3)) * 4
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
    free = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), free * measured, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_norm_gain_refuses_a_zero_gain(tiny_model_dirs, arch):
    loaded = load_model(tiny_model_dirs[arch], device="cpu")
    gain = _random_gain(loaded.d_model)
    gain[7] = 0.0
    _set_gain(loaded, arch, gain)
    with pytest.raises(ValueError, match="zero gain"):
        norm_gain(loaded.parts.final_norm, loaded.d_model)


def test_norm_gain_of_a_layer_norm_is_its_weight_and_bias(tiny_model_dirs):
    loaded = load_model(tiny_model_dirs["gpt2"], device="cpu")
    norm, d = loaded.parts.final_norm, loaded.d_model
    assert isinstance(norm, torch.nn.LayerNorm)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm.weight.copy_(_random_gain(d, seed=4))
        norm.bias.copy_(torch.randn(d, generator=generator))
    gain, bias = norm_gain(norm, d)
    assert torch.equal(gain, norm.weight.detach())
    assert torch.equal(bias, norm.bias.detach())
    x = torch.randn(5, d, generator=generator) * 3 + 1
    free = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), free * gain + bias, atol=1e-5, rtol=1e-5)


def test_norm_gain_refuses_a_zero_layer_norm_gain(tiny_model_dirs):
    loaded = load_model(tiny_model_dirs["gpt2"], device="cpu")
    with torch.no_grad():
        loaded.parts.final_norm.weight[3] = 0.0
    with pytest.raises(ValueError, match="zero gain"):
        norm_gain(loaded.parts.final_norm, loaded.d_model)


# --------------------------------------------------------------------------------------------------
# readout_rescaling on tiny models


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_readout_rescaling_keeps_logits_and_moves_cosines(tiny_model_dirs, arch):
    loaded = load_model(tiny_model_dirs[arch], device="cpu")
    gain = _random_gain(loaded.d_model)
    _set_gain(loaded, arch, gain)
    _anisotropic_unembedding(loaded)
    texts = SENTENCES[:5]

    # The logits the check folds are the model's own: lm_head(final_norm(h)) == model(...).logits.
    model_max = 0.0
    n_positions = 0
    for text in texts:
        h, logits = _norm_input_and_logits(loaded, text)
        with torch.no_grad():
            torch.testing.assert_close(loaded.parts.lm_head(loaded.parts.final_norm(h)), logits, atol=1e-5, rtol=1e-5)
        model_max = max(model_max, float(logits.abs().max()))
        n_positions += len(logits)

    values = _values(readout_rescaling(loaded, texts, pairs=4000, logit_positions=10_000))
    # every position of every text was compared, and the logits compared are the model's own
    assert values["positions"] == n_positions
    assert values["max_abs_logit"] == pytest.approx(model_max, rel=1e-5)
    assert values["max_abs_logit"] > 0.1  # a non-trivial scale, so the invariance below means something
    # METHODS sanity check 12: moving γ into W_U leaves every logit unchanged …
    assert values["max_abs_logit_change"] < 1e-9
    # … but not the cosines of the unembedding rows nor of the final-norm outputs (by far more than rounding)
    assert abs(values["unembedding_mean_cosine"] - values["unembedding_mean_cosine_folded"]) > 0.003
    assert abs(values["final_norm_mean_cosine"] - values["final_norm_mean_cosine_gain_free"]) > 0.003
    assert values["unembedding_neighbour_overlap"] < 1.0
    # control: a scalar rescaling moves no cosine
    assert values["scalar_rescaling_cosine_change"] < 1e-12
    assert values["gain_min"] == pytest.approx(float(gain.min()), abs=1e-6)
    assert values["gain_max"] == pytest.approx(float(gain.max()), abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_readout_rescaling_with_unit_gain_moves_nothing(tiny_model_dirs, arch):
    loaded = load_model(tiny_model_dirs[arch], device="cpu")
    _set_gain(loaded, arch, torch.ones(loaded.d_model))  # Llama weight = 1, Gemma weight = 0
    _anisotropic_unembedding(loaded)
    values = _values(readout_rescaling(loaded, SENTENCES[:4], pairs=4000))
    assert values["max_abs_logit_change"] < 1e-9
    assert values["unembedding_mean_cosine"] > 0.3  # the offset makes the cosines large; they still do not move
    assert values["unembedding_mean_cosine_folded"] == pytest.approx(values["unembedding_mean_cosine"], abs=1e-9)
    assert values["final_norm_mean_cosine_gain_free"] == pytest.approx(values["final_norm_mean_cosine"], abs=1e-9)
    assert values["unembedding_neighbour_overlap"] == 1.0
    assert values["gain_min"] == pytest.approx(1.0, abs=1e-6)
    assert values["gain_max"] == pytest.approx(1.0, abs=1e-6)


def test_readout_rescaling_with_a_layer_norm_keeps_logits(tiny_model_dirs):
    """GPT-2: γ and a bias β; the bias goes through W_U unchanged (β·W_Uᵀ)."""
    loaded = load_model(tiny_model_dirs["gpt2"], device="cpu")
    norm = loaded.parts.final_norm
    with torch.no_grad():
        norm.weight.copy_(_random_gain(loaded.d_model, seed=2))
        norm.bias.copy_(torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(6)))
    _anisotropic_unembedding(loaded)
    values = _values(readout_rescaling(loaded, SENTENCES[:4], pairs=4000))
    assert values["max_abs_logit"] > 0.1
    assert values["max_abs_logit_change"] < 1e-9
    assert abs(values["unembedding_mean_cosine"] - values["unembedding_mean_cosine_folded"]) > 0.003
    assert values["scalar_rescaling_cosine_change"] < 1e-12


# --------------------------------------------------------------------------------------------------
# mean_pair_cosine and neighbour_overlap against brute force


def _brute_cosines(rows: np.ndarray) -> np.ndarray:
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit @ unit.T


def test_mean_pair_cosine_equals_brute_force():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 12)) + rng.normal(size=12)
    scale = np.exp(rng.normal(size=12))
    pairs = rng.integers(0, 50, size=(300, 2))
    for s in (None, scale):
        scaled = rows if s is None else rows * s
        expected = _brute_cosines(scaled)[pairs[:, 0], pairs[:, 1]].mean()
        got = mean_pair_cosine(
            torch.from_numpy(rows).float(), torch.from_numpy(pairs), None if s is None else torch.from_numpy(s)
        )
        assert got == pytest.approx(expected, abs=1e-6)
    # a scalar rescaling moves nothing; a diagonal one does
    plain = mean_pair_cosine(torch.from_numpy(rows), torch.from_numpy(pairs))
    assert mean_pair_cosine(torch.from_numpy(rows), torch.from_numpy(pairs), torch.full((12,), 7.0)) == (
        pytest.approx(plain, abs=1e-12)
    )
    assert (
        abs(mean_pair_cosine(torch.from_numpy(rows), torch.from_numpy(pairs), torch.from_numpy(scale)) - plain) > 1e-3
    )


def _brute_overlap(matrix: np.ndarray, scale: np.ndarray, queries: np.ndarray, k: int) -> float:
    def nearest(m: np.ndarray) -> list[set[int]]:
        cos = _brute_cosines(m)[queries]
        cos[np.arange(len(queries)), queries] = -np.inf
        return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in cos]

    a, b = nearest(matrix), nearest(matrix * scale)
    return float(np.mean([len(x & y) / len(x | y) for x, y in zip(a, b, strict=True)]))


def test_neighbour_overlap_against_brute_force_and_blocks():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(300, 16))
    scale = np.exp(rng.normal(size=16))
    queries = rng.permutation(300)[:40]
    m, s, q = torch.from_numpy(matrix), torch.from_numpy(scale), torch.from_numpy(queries)
    assert neighbour_overlap(m, torch.ones(16, dtype=torch.float64), q, k=10) == 1.0
    whole = neighbour_overlap(m, s, q, k=10)
    assert whole == pytest.approx(_brute_overlap(matrix, scale, queries, 10), abs=1e-12)
    assert 0.0 < whole < 1.0
    for block in (1, 7, 64, 299, 300):
        assert neighbour_overlap(m, s, q, k=10, block=block) == whole
    # a scalar rescaling keeps every neighbour
    assert neighbour_overlap(m, torch.full((16,), 0.25, dtype=torch.float64), q, k=10) == 1.0
