"""The yardstick of the sampler-accuracy benchmark (benchmarks/gaussian_mixture.py):
its closed-form eps against autograd of the log-density, its probability-flow
ODE solver against the closed-form flow of one Gaussian, its sliced
Wasserstein distance against a known shift."""
import importlib.util
import math
import os

import pytest
import torch

from fastddpm import GaussianDiffusion

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gaussian_mixture.py")
_spec = importlib.util.spec_from_file_location("gaussian_mixture", _PATH)
gm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gm)


@pytest.mark.parametrize("t", [0, 10, 200, 600, 999])
def test_eps_is_minus_sigma_times_the_score(t):
    seed = 1000 + t
    g = torch.Generator().manual_seed(seed)
    law = gm.GaussianMixture(modes=5, shape=(3, 4, 4), std=0.1, seed=seed)
    abar = GaussianDiffusion.linear().alphas_cumprod.double()[t].item()
    x0, _ = law.sample(64, g)
    x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x[:8] = 0.3 * torch.randn(x[:8].shape, generator=g, dtype=torch.float64)    # points between modes too
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(law.log_density(x, abar).sum(), x)
    want = -math.sqrt(1 - abar) * score
    got = law.eps(x.detach().float(), abar)                                    # float32 input, float64 math
    got64 = law.eps(x.detach(), torch.full((64,), abar, dtype=torch.float64))  # per-sample abar
    assert got.dtype == torch.float64
    for out in (got64, got):
        rel = ((out - want).norm() / want.norm()).item()
        assert rel < (1e-12 if out is got64 else 1e-6), f"seed {seed}: rel err {rel:.2e}"


def test_probability_flow_matches_one_gaussians_closed_form():
    """For one Gaussian N(mu, s^2 I) the flow in y = x / alpha is
    y(sigma) = mu + (y0 - mu) sqrt((sigma^2 + s^2) / (sigma0^2 + s^2)); RK4's
    error shrinks ~16x per halved step."""
    g = torch.Generator().manual_seed(7)
    law = gm.GaussianMixture(modes=1, shape=(2, 3, 3), std=0.1, seed=7)
    x_T = torch.randn(32, 2, 3, 3, generator=g, dtype=torch.float64)
    sigma_max = 157.0
    y0 = x_T * math.sqrt(1 + sigma_max ** 2)
    mu = law.means.reshape(1, 2, 3, 3)
    want = mu + (y0 - mu) * 0.1 / math.sqrt(sigma_max ** 2 + 0.1 ** 2)
    err = [(gm.probability_flow(law, x_T, sigma_max, n) - want).abs().max().item() for n in (50, 100)]
    assert err[1] < 1e-5 and err[1] < err[0] / 10, f"max errors at 50 and 100 steps: {err}"


def test_sliced_w1_of_a_shift_and_mode_weights():
    g = torch.Generator().manual_seed(3)
    law = gm.GaussianMixture(modes=4, shape=(1, 2, 2), std=0.02, seed=3)
    x, labels = law.sample(4000, g, labels=torch.tensor([0] * 2500 + [1, 2, 3] * 500))
    assert torch.equal(law.nearest_mode(x), labels)
    w, tv = law.mode_weights(x)
    mass = torch.zeros(4, dtype=torch.float64).index_add_(0, law.nearest_mode(x), w)
    assert torch.allclose(mass, torch.full((4,), 0.25, dtype=torch.float64)), mass
    assert abs(tv - 0.375) < 1e-12, tv                          # 2500/4000 - 1/4 = 0.375
    dirs = gm.directions(4, 16, seed=0)
    levels = gm.quantile_levels(256)
    shift = torch.tensor([0.2, -0.1, 0.0, 0.3], dtype=torch.float64)
    q1 = gm.weighted_quantiles(x, w, dirs, levels)
    q2 = gm.weighted_quantiles(x + shift.reshape(1, 1, 2, 2), w, dirs, levels)
    want = (shift @ dirs).abs().mean().item()
    assert abs(gm.sliced_w1(q1, q2) - want) < 1e-12
