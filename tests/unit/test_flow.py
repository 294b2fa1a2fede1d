"""BERT-flow: METHODS §8.4 sanity checks (invertibility, log-det = autograd Jacobian, fitted z ≈ N(0, I))."""

import numpy as np
import pytest
import torch

from latent_atlas.geometry.flow import (
    FittedFlow,
    FlowSettings,
    GaussianisingFlow,
    build_flow,
    fit_flow,
    log_likelihood,
)
from latent_atlas.geometry.metrics import fit_post_processing

# Small MLPs and batches of 256 keep the fit fast and its last iterate close to the optimum.
SETTINGS = FlowSettings(hidden=64, epochs=20, batch_size=256)


def _banana(n: int, seed: int) -> np.ndarray:
    """Non-Gaussian data in d = 4: x₂ = x₁² + noise, then per-axis scales and offsets."""
    x = np.random.default_rng(seed).standard_normal((n, 4))
    x[:, 1] = x[:, 0] ** 2 + 0.5 * x[:, 1]
    return x * [1.0, 2.0, 3.0, 0.5] + [1.0, -2.0, 0.0, 5.0]


def _skewness(z: np.ndarray) -> np.ndarray:
    standard = (z - z.mean(0)) / z.std(0)
    return (standard**3).mean(0)


def _randomised(flow: GaussianisingFlow, scale: float = 0.3, seed: int = 0) -> GaussianisingFlow:
    """Perturb every parameter (the zero-initialised coupling outputs and V included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return flow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these tiny float64 ops gain nothing from two and crawl when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def banana_fit():
    train, heldout = _banana(4000, seed=0), _banana(4000, seed=1)
    return train, heldout, fit_flow(train, SETTINGS, seed=0)


def test_a_fitted_flow_inverts_to_float64_precision(banana_fit):
    _, heldout, flow = banana_fit
    np.testing.assert_allclose(flow.inverse(flow(heldout)), heldout, rtol=0, atol=1e-8)


@pytest.mark.parametrize("dim", [2, 7])  # 7: uneven halves
def test_a_randomised_flow_inverts_to_float64_precision(dim):
    x = 3.0 * np.random.default_rng(2).standard_normal((200, dim)) + 1.0
    flow = FittedFlow(_randomised(build_flow(x, FlowSettings(hidden=32), seed=3)), [])
    z = flow(x)
    assert np.abs(z - fit_post_processing(x, "whiten")(x)).max() > 0.1  # the couplings do something
    np.testing.assert_allclose(flow.inverse(z), x, rtol=0, atol=1e-8)


def test_the_log_det_equals_the_autograd_jacobian():
    x = torch.tensor(np.random.default_rng(4).standard_normal((50, 6)))
    flow = _randomised(build_flow(x.numpy(), FlowSettings(hidden=16, couplings=3), seed=5))
    _, logdet = flow(x)
    for row in range(4):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[row])
        sign, logabsdet = torch.linalg.slogdet(jacobian)
        assert sign != 0
        assert logdet[row].item() == pytest.approx(logabsdet.item(), abs=1e-10)
    assert logdet.std() > 0.1  # the couplings' log-det varies by row, so the check is not just the linear part


def test_an_untrained_flow_is_the_whitening_transform():
    x = np.random.default_rng(6).standard_normal((500, 5)) @ np.random.default_rng(7).standard_normal((5, 5)) + 4
    flow = fit_flow(x, FlowSettings(epochs=0, hidden=16, validation_fraction=0.0))
    z = flow(x)
    assert flow.losses == []
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(5), atol=1e-3)  # ε·mean(Λ) shrinks small Λ
    reference = fit_post_processing(x, "whiten", epsilon=1e-6)(x)  # also regularised by ε·mean(Λ)
    signs = np.sign((z * reference).sum(0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(z, reference * signs, atol=1e-8)
    whitening_logdet = np.linalg.slogdet(flow.module.linear.weight.numpy())[1]
    expected = -0.5 * ((z**2).sum(1) + 5 * np.log(2 * np.pi)) + whitening_logdet
    np.testing.assert_allclose(flow.log_likelihood(x), expected, rtol=1e-12)


def test_fewer_points_than_dimensions_stay_invertible():
    x = np.random.default_rng(8).standard_normal((10, 32))
    flow = fit_flow(x, FlowSettings(epochs=2, hidden=16, batch_size=4))
    z = flow(x)
    assert np.isfinite(z).all() and np.isfinite(flow.losses).all()
    np.testing.assert_allclose(flow.inverse(z), x, rtol=0, atol=1e-8)
    assert np.linalg.matrix_rank(np.cov(z, rowvar=False), tol=1e-3) == 9  # n − 1 whitened directions


def test_fitting_gaussianises_held_out_data(banana_fit):
    train, heldout, flow = banana_fit
    whitening = FittedFlow(build_flow(train, SETTINGS, seed=0), [])
    z = flow(heldout)
    assert np.abs(z.mean(0)).max() < 0.1
    assert np.abs(np.cov(z, rowvar=False) - np.eye(4)).max() < 0.15
    assert 1 <= len(flow.losses) <= SETTINGS.epochs and flow.losses[-1] < flow.losses[0]
    assert flow.best_epoch > 0  # on 4000 banana points in 4-d, training beats whitening on held-back rows
    assert flow.validation_losses[flow.best_epoch] == min(flow.validation_losses)
    assert flow.log_likelihood(heldout).mean() > whitening.log_likelihood(heldout).mean() + 0.5
    assert np.abs(_skewness(z)).max() < 0.3 < 1.5 < np.abs(_skewness(whitening(heldout))).max()


def test_the_same_seed_gives_the_same_flow_and_another_seed_a_different_one():
    x = _banana(300, seed=9)
    settings = FlowSettings(hidden=16, epochs=3, batch_size=64)
    state = torch.get_rng_state()
    first, again, other = (fit_flow(x, settings, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert first.losses == again.losses and np.array_equal(first(x), again(x))
    assert first.losses != other.losses and not np.allclose(first(x), other(x))


def test_a_fitted_flow_applies_like_a_post_processing(banana_fit):
    _, heldout, flow = banana_fit
    assert flow.name == "flow"
    for post_processing in (fit_post_processing(heldout, "whiten"), flow):
        z = post_processing(heldout[:6].reshape(2, 3, 4))
        assert z.shape == (2, 3, 4) and z.dtype == np.float64
    np.testing.assert_array_equal(flow(heldout[0]), flow(heldout[:1])[0])
    assert flow.log_likelihood(heldout[:6].reshape(2, 3, 4)).shape == (2, 3)


def test_log_likelihood_of_the_module_matches_the_fitted_flow(banana_fit):
    _, heldout, flow = banana_fit
    with torch.no_grad():
        direct = log_likelihood(flow.module, torch.tensor(heldout[:10])).numpy()
    np.testing.assert_allclose(direct, flow.log_likelihood(heldout[:10]), rtol=1e-12)


def test_settings_from_config():
    assert FlowSettings.from_config({"epochs": 1, "hidden": 8}) == FlowSettings(epochs=1, hidden=8)
    with pytest.raises(ValueError, match=r"unknown flow setting 'layers'; valid settings are couplings, hidden"):
        FlowSettings.from_config({"layers": 3})
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        FlowSettings(batch_size=0)
    with pytest.raises(ValueError, match=r"learning_rate must be a positive number, got -0.1"):
        FlowSettings.from_config({"learning_rate": -0.1})


def test_bad_input_is_refused_with_a_clear_message(banana_fit):
    _, heldout, flow = banana_fit
    with pytest.raises(ValueError, match=r"at least 2 rows of states, got 1"):
        fit_flow(heldout[:1], SETTINGS)
    bad = heldout[:20].copy()
    bad[3, 2] = np.nan
    bad[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"the states contain 2 non-finite values"):
        fit_flow(bad, SETTINGS)
    with pytest.raises(ValueError, match=r"shape \(n, d\), got shape \(20,\)"):
        fit_flow(heldout[:20, 0], SETTINGS)
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got 1"):
        fit_flow(heldout[:20, :1], SETTINGS)
    with pytest.raises(ValueError, match=r"zero variance"):
        fit_flow(np.ones((10, 3)), SETTINGS)
    with pytest.raises(ValueError, match=r"expects arrays with last dimension 4, got 3"):
        flow(heldout[:5, :3])
    with pytest.raises(ValueError, match=r"expects arrays with last dimension 4, got 5"):
        flow.inverse(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"the input contains 2 non-finite values"):
        flow(bad)


def test_with_few_points_per_dimension_early_stopping_keeps_the_best_held_back_epoch():
    """n ≈ 3d, as for pooled sentences of a small corpus: training overfits; the kept epoch is the best one."""
    rng = np.random.default_rng(11)
    x = np.tanh(rng.standard_normal((96, 32)) @ rng.standard_normal((32, 32)))
    flow = fit_flow(x, FlowSettings(hidden=32, epochs=15, batch_size=16, learning_rate=1e-2, patience=3))
    kept = flow.validation_losses[flow.best_epoch]
    assert kept == min(flow.validation_losses) and kept <= flow.validation_losses[0]
    assert len(flow.validation_losses) == len(flow.losses) + 1  # index 0 is whitening alone
    with pytest.raises(ValueError, match="validation_fraction"):
        FlowSettings(validation_fraction=1.0)
