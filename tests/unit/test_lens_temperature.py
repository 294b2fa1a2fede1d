"""Fitted lens temperatures (issue 17 item 4): the fit recovers planted and brute-force optima.

Expected temperatures come from the construction (a target that *is* softmax(s / T*)) or from a grid of
cross-entropies computed here with ``torch.log_softmax`` in float64, never from the code under test.
"""

import math

import numpy as np
import polars as pl
import pytest
import torch

from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.lenses import SemanticBasisLens, Unembed
from latent_atlas.lenses.evaluate import evaluation_tokens
from latent_atlas.lenses.pipeline import build_lenses
from latent_atlas.lenses.temperature import (
    TEMPERATURE_BOUNDS,
    TemperatureScaledLens,
    fit_lens_temperatures,
    fit_temperature,
)
from latent_atlas.models import load_model
from latent_atlas.store import ActivationStore
from latent_atlas.testing import _WORDS
from tests.conftest import STORE_ATTRS


def _cross_entropy(scores: torch.Tensor, target_log_probs: torch.Tensor, temperature: float) -> float:
    """Mean over rows of H(p, softmax(scores / T)), in float64."""
    log_q = torch.log_softmax(scores.double() / temperature, dim=-1)
    return float(-(target_log_probs.double().exp() * log_q).sum(-1).mean())


def _grid_minimiser(scores: torch.Tensor, target_log_probs: torch.Tensor, low: float, high: float) -> tuple:
    """Brute force: the best of 101 log-spaced temperatures, then of 101 around it; (T, loss, log spacing)."""
    for _ in range(2):
        grid = np.exp(np.linspace(math.log(low), math.log(high), 101))
        losses = [_cross_entropy(scores, target_log_probs, t) for t in grid]
        best, spacing = int(np.argmin(losses)), math.log(grid[1] / grid[0])
        low, high = grid[max(best - 2, 0)], grid[min(best + 2, 100)]
    return grid[best], losses[best], spacing


@pytest.mark.parametrize("planted", [0.02, 0.7, 40.0])
def test_fit_recovers_a_planted_temperature(planted):
    """When p = softmax(s / T*), KL(p || softmax(s / T)) = 0 only at T = T*."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 300, generator=generator) * 0.5
    target = torch.log_softmax(scores.double() / planted, dim=-1).float()
    assert fit_temperature(scores, target) == pytest.approx(planted, rel=1e-4)


def test_fit_matches_a_brute_force_grid():
    """Targets outside the family (noisy, peaked on other tokens): the grid's minimiser is the fit's."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 200, generator=generator)
    logits = 3 * scores + 2 * torch.randn(50, 200, generator=generator)
    target = torch.log_softmax(logits, dim=-1)
    best, loss, spacing = _grid_minimiser(scores, target, 1e-2, 1e2)
    fitted = fit_temperature(scores, target)
    assert abs(math.log(fitted / best)) <= spacing
    assert _cross_entropy(scores, target, fitted) <= loss + 1e-9


def test_scores_no_better_than_uniform_get_the_largest_temperature():
    """p on each row's lowest score: E_p[s] < mean(s), so the loss falls all the way to T = infinity."""
    scores = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    target = torch.full_like(scores, -1e4).scatter(-1, scores.argmin(-1, keepdim=True), 0.0)
    assert fit_temperature(scores, target) == TEMPERATURE_BOUNDS[1]
    with pytest.raises(ValueError, match=r"must both be \(N, V\)"):
        fit_temperature(scores, target[:, :3])


def test_scaled_lens_divides_by_its_layer_factor(tiny_loaded):
    lens = SemanticBasisLens(Unembed.from_parts(tiny_loaded.parts), temperature=0.5)
    scaled = TemperatureScaledLens(lens, {1: 0.2})
    h = torch.randn(3, tiny_loaded.d_model)
    torch.testing.assert_close(scaled.logits(h, 1), lens.logits(h, 1) / 0.2)
    assert scaled.reads(1) and not scaled.reads(2) and scaled.name == "semantic_basis"
    assert scaled.temperature_at(1) == pytest.approx(0.1)  # on the cosine scale


def test_store_fit_minimises_training_kl_of_independently_computed_cosines(tiny_model_dirs, tmp_path):
    """On stored states, the recorded semantic-basis temperature is the grid minimiser of the training CE.

    Cosines to the rows of pinv(W_U^T) (torch.linalg.pinv) and the final distribution (the model's own
    head on the stored ``ln_final``) are computed here.
    """
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(_WORDS, size=20)) for _ in range(24)]
    corpus = pl.DataFrame(
        {
            "doc_id": [f"r{i}" for i in range(24)],
            "text": texts,
            "label": ["x"] * 24,
            "split": ["heldout" if i % 4 == 0 else "train" for i in range(24)],
            "source": ["test"] * 24,
        }
    )
    path = tmp_path / "s.h5"
    extract_activations(loaded, corpus, path, ExtractionSettings(dtype="float32", device="cpu"), STORE_ATTRS, False)
    unembed = Unembed.from_parts(loaded.parts)
    lenses = build_lenses(loaded, {"semantic_basis": {"temperature": 0.05}}, None)
    layer = 2
    with ActivationStore(path) as store:
        tokens = evaluation_tokens(store, "train", None, skip_first_position=True)
        fitted, table = fit_lens_temperatures(store, unembed, lenses, [layer], tokens, chunk_size=17)
        states = torch.from_numpy(store.read(layer, tokens.rows)).double()
        final = torch.from_numpy(store.read("ln_final", tokens.rows)).double()
    assert set(table["lens"]) == {"semantic_basis", "inverse_embedding_transpose", "inverse_embedding_pinv"}
    assert fitted["logit"] is lenses["logit"] and isinstance(fitted["semantic_basis"], TemperatureScaledLens)
    head = loaded.model.get_output_embeddings().weight.detach().double()  # (V, d)
    with torch.no_grad():
        target = torch.log_softmax(final @ head.T, dim=-1)
        normed = loaded.parts.final_norm(states.float()).double()
    bases = torch.linalg.pinv(head.T)  # (V, d)
    live = bases.norm(dim=-1) > 1e-8
    unit = torch.where(live[:, None], bases / bases.norm(dim=-1, keepdim=True).clamp_min(1e-300), 0.0)
    cosines = (normed / normed.norm(dim=-1, keepdim=True)) @ unit.T
    best, loss, spacing = _grid_minimiser(cosines, target, 1e-3, 1e1)
    recorded = table.filter(pl.col("lens") == "semantic_basis", pl.col("layer") == layer)["temperature"].item()
    assert abs(math.log(recorded / best)) <= 2 * spacing
    assert _cross_entropy(cosines, target, recorded) <= loss + 1e-6
