"""Samplers (ddpm ancestral/respaced, ddim, dpmpp2m), the sampler loop and the
sample CLI.

* Coefficient tables against the papers' formulas, written here independently
  (per step, in Python floats).
* Identities: respaced DDPM over all T steps is the paper's ancestral sampler;
  DDIM with eta = 1 over all steps is ancestral DDPM with fixedsmall; DDIM with
  eta = 0 is deterministic.
* Exact-model checks, no network: for data N(mu, s^2 I) the optimal
  eps(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar);
  with it as the model every sampler must reproduce mu and s.
* The CLI as a user runs it: every sampler, bad flags, bad --out / --device,
  NaN weights, seeds that must not overlap.
"""
import json
import math
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import fastddpm.sampling as sampling
from fastddpm import GaussianDiffusion, UNet, UNetConfig, checkpoint, loader, ops, reference
from fastddpm.sample import main as sample_main
from fastddpm.sampling import make_plan, sample, sample_batch, spaced_timesteps
from fastddpm.sampling.graphs import CudaGraphRunner

CFG = UNetConfig.tiny(image_size=8, ch=16, ch_mult=(1,), attn_resolutions=(8,), num_groups=4)


def _model(seed=0):
    torch.manual_seed(seed)
    m = UNet(CFG)
    for p in m.parameters():  # leave the zero init so the output depends on x and t
        torch.nn.init.normal_(p, std=0.05)
    return m


def _write_ckpt(path, model, diffusion, ema=True):
    sd = model.state_dict()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 7,
                            "config": {"model": CFG.to_dict(), "diffusion": diffusion.config},
                            "model": {k: torch.zeros_like(v) for k, v in sd.items()} if ema else sd,
                            "ema": sd if ema else None}, path)


@pytest.fixture
def one_thread():
    """The exact-model loops are many tiny ops: one thread avoids thread start-up costs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "logsnr"])
@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 20), (1000, 10), (1000, 1), (1000, 1000), (10, 3),
                                     (10, 9), (7, 7)])
def test_spacing_gives_exactly_n_distinct_decreasing_timesteps(spacing, T, steps):
    abar = GaussianDiffusion.linear(T=T).alphas_cumprod.numpy()
    ts = spaced_timesteps(T, steps, spacing, abar)
    assert len(ts) == steps and len(set(ts.tolist())) == steps
    assert all(a > b for a, b in zip(ts[:-1], ts[1:])) and ts[-1] >= 0 and ts[0] <= T - 1
    if steps == T:
        assert ts.tolist() == list(range(T - 1, -1, -1))


def test_spacings_follow_the_papers():
    assert spaced_timesteps(1000, 50, "uniform").tolist() == list(range(980, -1, -20))   # DDIM's range(0, T, 20)
    # DDIM's quadratic seq: int(linspace(0, sqrt(0.8 T), 50)^2); it repeats 0 at 50 steps, deduplicated here
    raw = [int(v) for v in np.linspace(0, np.sqrt(800), 50) ** 2]
    assert raw[:2] == [0, 0]
    q = spaced_timesteps(1000, 50, "quadratic")[::-1].tolist()
    assert q[0] == 0 and q[1] == 1 and q[-1] == raw[-1] == 800 and q[10:] == raw[10:]
    abar = GaussianDiffusion.linear().alphas_cumprod.numpy()
    lam = 0.5 * np.log(abar / (1 - abar))
    ls = spaced_timesteps(1000, 10, "logsnr", abar)
    assert ls[0] == 999 and ls[-1] == 0
    assert np.ptp(np.diff(lam[ls])) < 0.1 * abs(np.diff(lam[ls])).mean()   # ~uniform in lambda


# ----------------------------------------------------------------------------- coefficient tables


def _apply(plan, i, x, eps, z, past=()):
    """Row i of the plan through the reference update, in float64, no clipping;
    past = (H_{i-1}, H_{i-2}, ...) placed in the history ring where row i reads them."""
    table = plan.table.double()
    ring = None
    if plan.history:
        R = plan.history + 1
        ring = torch.full((R, *x.shape), float("nan"), dtype=torch.float64)
        ring[i % R] = 0.0                                   # the slot this row writes
        for j in range(1, R):
            ring[(i - j) % R] = past[j - 1] if j <= len(past) else 0.0
    out, x0 = reference.sample_step_ref(x, eps, table, torch.tensor([i]), ring, z, None, clip=False)
    return out, x0


def _abars(d, plan):
    a = [d.alphas_cumprod[t].item() for t in plan.timesteps]
    return a, a[1:] + [1.0]


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("steps", [1000, 37, 5, 1])
def test_ddpm_table_is_respaced_posterior(variance, steps):
    """Nichol & Dhariwal respacing: beta_i = 1 - abar_i / abar_{i+1}, then the paper's posterior."""
    d = GaussianDiffusion.linear(variance=variance)
    plan = make_plan(d, "ddpm", steps, spacing="uniform")
    a, a_next = _abars(d, plan)
    x, eps, z = (torch.randn(3, 5, dtype=torch.float64) for _ in range(3))
    for i in range(len(a)):
        beta = 1 - a[i] / a_next[i]
        post_var = beta * (1 - a_next[i]) / (1 - a[i])
        # no noise in the last step; the index-0 log-variance clip never reaches a step that adds noise
        var = 0.0 if i == len(a) - 1 else beta if variance == "fixedlarge" else post_var
        x0 = x / math.sqrt(a[i]) - math.sqrt(1 / a[i] - 1) * eps
        mean = beta * math.sqrt(a_next[i]) / (1 - a[i]) * x0 + (1 - a_next[i]) * math.sqrt(1 - beta) / (1 - a[i]) * x
        out, x0_hat = _apply(plan, i, x, eps, z)
        torch.testing.assert_close(out, mean + math.sqrt(var) * z, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-12, atol=1e-12)


def test_full_respacing_equals_the_diffusion_buffers():
    for variance in ("fixedlarge", "fixedsmall"):
        d = GaussianDiffusion.linear(variance=variance)
        tab = make_plan(d, "ddpm").table.flip(0)          # increasing t
        sigma = (0.5 * d.model_log_variance).exp()
        sigma[0] = 0
        zero = torch.zeros(1000, dtype=torch.float64)
        cols = dict(zip(reference.SAMPLER_COEFS, tab.unbind(1)))
        for name, buf in (("a_x", d.sqrt_recip_alphas_cumprod), ("a_e", d.sqrt_recipm1_alphas_cumprod),
                          ("c_x", d.posterior_mean_coef2), ("c_0", d.posterior_mean_coef1), ("c_1", zero),
                          ("c_2", zero), ("c_3", zero), ("c_4", zero), ("h_x", zero), ("h_0", zero),
                          ("sigma", sigma)):
            torch.testing.assert_close(cols[name], buf, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps,spacing", [(50, "quadratic"), (20, "uniform"), (1, "uniform")])
def test_ddim_table_is_song_eq_12(eta, steps, spacing):
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (DDIM eq. 12)."""
    d = GaussianDiffusion.linear()
    plan = make_plan(d, "ddim", steps, eta=eta, spacing=spacing)
    a, a_next = _abars(d, plan)
    x, eps, z = (torch.randn(3, 5, dtype=torch.float64) for _ in range(3))
    for i in range(len(a)):
        sigma = eta * math.sqrt((1 - a_next[i]) / (1 - a[i]) * (1 - a[i] / a_next[i]))
        x0 = (x - math.sqrt(1 - a[i]) * eps) / math.sqrt(a[i])
        expect = math.sqrt(a_next[i]) * x0 + math.sqrt(1 - a_next[i] - sigma ** 2) * eps + sigma * z
        torch.testing.assert_close(_apply(plan, i, x, eps, z)[0], expect, rtol=1e-9, atol=1e-12)
    assert plan.stochastic == (eta > 0 and steps > 1)


@pytest.mark.parametrize("steps", [20, 10, 2, 1])
def test_dpmpp2m_table_is_lu_algorithm_2(steps):
    """DPM-Solver++(2M): x_i = (s_i / s_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i with
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}; first order first; last step x = x0."""
    d = GaussianDiffusion.linear()
    plan = make_plan(d, "dpmpp2m", steps)
    a, a_next = _abars(d, plan)
    lam = lambda v: math.log(math.sqrt(v) / math.sqrt(1 - v))   # noqa: E731
    x, eps, z, prev = (torch.randn(3, 5, dtype=torch.float64) for _ in range(4))
    for i in range(len(a)):
        x0 = (x - math.sqrt(1 - a[i]) * eps) / math.sqrt(a[i])
        if i == len(a) - 1:
            expect = x0
        else:
            h = lam(a_next[i]) - lam(a[i])
            if i == 0:
                D = x0
            else:
                r = (lam(a[i]) - lam(a[i - 1])) / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
            expect = math.sqrt(1 - a_next[i]) / math.sqrt(1 - a[i]) * x - math.sqrt(a_next[i]) * (math.exp(-h) - 1) * D
        out, x0_hat = _apply(plan, i, x, eps, z, (prev,))
        torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-12)
    assert plan.multistep and plan.history == 1 and not plan.stochastic


def test_ddim_eta1_table_equals_ddpm_fixedsmall():
    d = GaussianDiffusion.linear(variance="fixedsmall")
    ddim, ddpm = make_plan(d, "ddim", eta=1.0, spacing="uniform"), make_plan(d, "ddpm")
    # the clipped log-variance differs only in the last row, where no noise is added
    torch.testing.assert_close(ddim.table, ddpm.table, rtol=1e-7, atol=1e-12)


def test_bad_sampler_arguments():
    d = GaussianDiffusion.linear(T=10)
    for kw, match in [({"sampler": "euler"}, "unknown sampler"), ({"steps": 0}, "steps"), ({"steps": 11}, "steps"),
                      ({"steps": 2.5}, "steps"), ({"sampler": "ddim", "eta": -0.1}, "eta"),
                      ({"sampler": "ddim", "eta": 1.5}, "eta"), ({"sampler": "ddpm", "eta": 0.5}, "ddim sampler only"),
                      ({"spacing": "cubic"}, "spacing"),
                      ({"sampler": "ddim", "variance": "fixedsmall"}, "ddpm sampler only")]:
        with pytest.raises(ValueError, match=match):
            make_plan(d, **kw)
    m = _model()
    for kw, match in [({"n": 0}, "n must"), ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"),
                      ({"seed": 2**63}, "seed"), ({"sampler": "plms"}, "unknown sampler"),
                      ({"cuda_graphs": True, "device": "cpu"}, "CUDA")]:
        args = {"n": 1, **kw}
        with pytest.raises(ValueError, match=match):
            sample(m, d, progress=False, **args)


# ----------------------------------------------------------------------------- the loop on a tiny net


def _ancestral(model, d, n, seed, first_sample=0, variance_buffer=None, ddim_eta1=False):
    """The paper's Algorithm 2 with GaussianDiffusion's own step and the sampler's noise stream."""
    shape = (n, 3, 8, 8)
    rng = torch.tensor([seed, 0, first_sample])
    x = reference.philox_normal_ref(rng, shape)
    with torch.no_grad():
        for k, i in enumerate(reversed(range(d.num_timesteps))):
            t = torch.full((n,), i)
            z = reference.philox_normal_ref(torch.tensor([seed, k + 1, first_sample]), shape)
            x = d.p_sample_step(x, t, model.eval()(x, t), z)
    return x


def test_sampler_is_deterministic_in_range_and_algorithm_2():
    model, d = _model(), GaussianDiffusion.linear(T=6)
    a = sample(model, d, 5, batch_size=2, seed=3, progress=False)
    b = sample(model, d, 5, batch_size=2, seed=3, progress=False)
    assert a.shape == (5, 3, 8, 8) and a.dtype == torch.float32 and torch.equal(a, b)
    # the last step adds no noise and its mean is a clipped x0_hat: the result lies in [-1, 1]
    assert a.abs().max() <= 1.0 + 1e-6 and a.std() > 0.05
    # respaced DDPM over all T steps is the ancestral sampler; batch 2 holds images 2 and 3
    torch.testing.assert_close(a[2:4], _ancestral(model, d, 2, seed=3, first_sample=2), atol=1e-5, rtol=1e-5)


def test_ddim_eta1_over_all_steps_is_ddpm_fixedsmall():
    model, d = _model(), GaussianDiffusion.linear(T=8, variance="fixedsmall")
    a = sample(model, d, 3, seed=5, progress=False, sampler="ddim", eta=1.0, spacing="uniform")
    b = sample(model, d, 3, seed=5, progress=False, sampler="ddpm")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, sample(model, d, 3, seed=6, progress=False, sampler="ddpm"))


def test_ddim_eta0_is_deterministic_given_x_T():
    """No noise after x_T: a hand-written DDIM ODE loop from the same x_T gives the samples."""
    model, d = _model(), GaussianDiffusion.linear(T=20)
    out = sample(model, d, 3, seed=9, progress=False, sampler="ddim", steps=5, spacing="uniform")
    x = reference.philox_normal_ref(torch.tensor([9, 0, 0]), (3, 3, 8, 8)).double()
    ts = [16, 12, 8, 4, 0]
    abar = d.alphas_cumprod
    with torch.no_grad():
        for i, t in enumerate(ts):
            a, a_prev = abar[t].item(), (abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0)
            eps = model.eval()(x.float(), torch.full((3,), t)).double()
            x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(out, x.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 4), ("ddim", 3), ("dpmpp2m", 3)])
def test_images_depend_on_seed_and_index_only(sampler, steps):
    """Issue 10.4: image i is stream (seed, i): --seed 3's second batch is not --seed 4's
    first, a smaller n is a prefix, and batch_size does not change the noise."""
    model, d = _model(), GaussianDiffusion.linear(T=10)
    kw = dict(progress=False, sampler=sampler, steps=steps)
    s3 = sample(model, d, 4, batch_size=2, seed=3, **kw)
    s4 = sample(model, d, 4, batch_size=2, seed=4, **kw)
    dist = (s3[:, None] - s4[None]).flatten(2).abs().amax(-1)
    assert dist.min() > 1e-2                                    # no image shared between seeds
    torch.testing.assert_close(sample(model, d, 3, batch_size=3, seed=3, **kw), s3[:3], atol=1e-5, rtol=1e-5)


def test_non_finite_network_is_refused():
    model, d = _model(), GaussianDiffusion.linear(T=5)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(sampling.NonFiniteSamplesError, match="non-finite"):
        sample(model, d, 2, progress=False)

    class Inf(torch.nn.Module):   # +inf eps: clipping hides it in x, the eps check does not
        config = CFG

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return torch.full_like(x, float("inf")) * self.w

    with pytest.raises(sampling.NonFiniteSamplesError, match="non-finite"):
        sample(Inf(), d, 2, progress=False)


def test_graph_runner_falls_back_to_eager_when_capture_fails(monkeypatch):
    model, d = _model(), GaussianDiffusion.linear(T=6)
    plan = make_plan(d, "ddim", 3)
    messages = []
    runner = CudaGraphRunner(log=messages.append)

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(runner, "_capture", boom)
    kw = dict(plan=plan, device="cpu", progress=False)
    out = sample_batch(model, d, 2, 7, runner=runner, **kw)
    assert messages == ["cuda graphs: capture failed (RuntimeError: CUDA out of memory. Tried to allocate "
                        "2.00 GiB); sampling eagerly"]
    assert torch.equal(out, sample_batch(model, d, 2, 7, **kw))
    sample_batch(model, d, 2, 7, runner=runner, **kw)        # said once, not per batch
    assert len(messages) == 1 and runner.disabled


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay() runs the recorded step."""

    def __init__(self, step):
        step()                   # the warm-up call, which advances the state as on a GPU
        self.replay = step


@pytest.mark.parametrize("sampler,steps", [("ddpm", 3), ("dpmpp2m", 3)])
def test_graph_runner_state_handling(monkeypatch, sampler, steps):
    """The runner's own logic without a GPU: one recorded step replayed for every
    step, buffers refilled per batch (the warm-up's advance undone), graphs
    reused per shape and evicted beyond max_graphs; same samples as eager."""
    monkeypatch.setattr(CudaGraphRunner, "_record", staticmethod(lambda step, device: _EagerGraph(step)))
    model, d = _model(), GaussianDiffusion.linear(T=10)
    plan = make_plan(d, sampler, steps)
    runner = CudaGraphRunner(max_graphs=2)
    kw = dict(plan=plan, device="cpu", progress=False)
    for n, seed, first in [(3, 0, 0), (3, 1, 3), (2, 0, 6), (1, 0, 8), (3, 0, 0)]:
        graphed = sample_batch(model, d, n, seed, first_sample=first, runner=runner, **kw)
        assert torch.equal(graphed, sample_batch(model, d, n, seed, first_sample=first, **kw))
    assert len(runner) == 2 and runner.disabled is None


def test_graph_runner_recaptures_a_model_whose_tensors_moved(monkeypatch):
    """A kept runner (sample(cuda_graphs=runner) across calls) never replays a graph
    on a model's old addresses: new parameter storage means a new capture."""
    monkeypatch.setattr(CudaGraphRunner, "_record", staticmethod(lambda step, device: _EagerGraph(step)))
    model, d = _model(), GaussianDiffusion.linear(T=10)
    plan = make_plan(d, "unipc", 4)
    runner = CudaGraphRunner()
    kw = dict(plan=plan, device="cpu", progress=False, runner=runner)
    a = sample_batch(model, d, 2, 0, **kw)
    assert torch.equal(sample_batch(model, d, 2, 0, **kw), a) and len(runner) == 1
    model.double().float()                     # same values, new storage
    assert torch.equal(sample_batch(model, d, 2, 0, **kw), a) and len(runner) == 2


# ----------------------------------------------------------------------------- exact Gaussian model


class GaussianEps(torch.nn.Module):
    """The optimal eps(x_t, t) for data N(mu, s^2 I): E[eps | x_t]."""

    def __init__(self, diffusion, mu, s):
        super().__init__()
        self.register_buffer("abar", diffusion.alphas_cumprod.float())
        self.register_buffer("mu", mu)
        self.s = s
        self.config = types.SimpleNamespace(in_channels=mu.shape[0], image_size=mu.shape[1])
        self.anchor = torch.nn.Parameter(torch.zeros(()))   # gives the sampler a device

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)


MU = torch.tensor([0.5, -0.3, 0.1, 0.8]).view(1, 2, 2)
S = 0.5
N_EXACT = 4096
# (sampler, steps, kwargs, tolerance on max |mean - mu| per dim, on |std / s - 1|)
# Statistical part: the mean's standard error is S / 64 = 0.008 per dim (the bound
# is the max over 4 dims), the pooled std's 0.55%; the rest is each sampler's own
# discretization error for this wide Gaussian (exact for the deterministic samplers:
# their update is affine in x_T). Std errors measured with seed 1: 2026-12-01 ddpm
# 1000 1.2%, ddim 50 / 20 (quadratic) 2.7% / 7.2%, stochastic ddim 50 6.8%;
# 2026-12-07 on the default (quadratic) grids dpmpp2m 20 / 10 2.2% / 9.4%, dpmpp3m
# 10 5.0%, unipc 10 0.25%, and dpmpp2m 10 on logsnr 3.5% (this law favours logsnr
# for dpmpp2m; the accuracy benchmark's mixture, which sets the defaults, does
# not); mean errors <= 0.023.
EXACT_CASES = [("ddpm", 1000, {}, 0.04, 0.03), ("ddim", 50, {}, 0.04, 0.05), ("ddim", 20, {}, 0.04, 0.09),
               ("dpmpp2m", 20, {}, 0.04, 0.04), ("dpmpp2m", 10, {}, 0.04, 0.12),
               ("dpmpp2m", 10, {"spacing": "logsnr"}, 0.04, 0.05), ("dpmpp3m", 10, {}, 0.04, 0.07),
               ("unipc", 10, {}, 0.04, 0.02), ("ddim", 50, {"eta": 1.0}, 0.04, 0.09)]


@pytest.mark.parametrize("sampler,steps,kw,tol_mu,tol_s", EXACT_CASES,
                         ids=[f"{c[0]}-{c[1]}" + "".join(f"-{v}" for v in c[2].values()) for c in EXACT_CASES])
def test_exact_gaussian_model_is_reproduced(one_thread, sampler, steps, kw, tol_mu, tol_s):
    d = GaussianDiffusion.linear()
    model = GaussianEps(d, MU, S)
    x = sample(model, d, N_EXACT, batch_size=N_EXACT, seed=1, progress=False, clip=False, sampler=sampler,
               steps=steps, **kw).double()
    mean = x.mean(0)
    err_mu = (mean - MU).abs().max().item()
    err_s = abs(((x - mean) ** 2).mean().sqrt().item() / S - 1)
    assert err_mu < tol_mu, f"{sampler} {steps}: mean off by {err_mu:.4f}"
    assert err_s < tol_s, f"{sampler} {steps}: std off by {err_s:.2%}"


def test_ddim_encode_then_decode_returns_x0(one_thread):
    """DDIM eta = 0 is an invertible ODE: run it backwards (x0 -> x_T, DDIM paper
    section 4.3) with the exact model, then sample from that x_T."""
    d = GaussianDiffusion.linear()
    model = GaussianEps(d, MU, S)
    plan = make_plan(d, "ddim", 200, spacing="uniform")
    x0 = MU + S * torch.randn(256, *MU.shape)
    abar = [d.alphas_cumprod[t].item() for t in plan.timesteps]
    x = x0.double()
    prev_a = 1.0
    for t, a in zip(reversed(plan.timesteps), reversed(abar)):   # increasing noise
        eps = model(x.float(), torch.full((len(x),), t)).double() if prev_a < 1.0 else torch.zeros_like(x)
        x0_hat = (x - math.sqrt(1 - prev_a) * eps) / math.sqrt(prev_a)
        x = math.sqrt(a) * x0_hat + math.sqrt(1 - a) * eps
        prev_a = a
    assert x.std() > 0.9                                          # x_T looks like noise
    state = sampling.StepState.allocate(plan, tuple(x.shape), torch.device("cpu"))
    state.reset(0, 0)
    state.x.copy_(x.float())
    with torch.no_grad():
        for _ in range(plan.steps):
            sampling.denoise_step(model, state, "fp32", clip=False)
    # both directions are first order: ||x0' - x0|| / ||x0|| ~ 2.8 / steps (1.5% measured)
    err = ((state.x - x0).norm() / x0.norm()).item()
    assert err < 0.025, f"decoded x0 off by {err:.2%}"


# ----------------------------------------------------------------------------- restart, threshold


def test_restart_plan_repeats_the_stretch_and_folds_the_renoising():
    """Restart (lo, hi, K) on the ddpm grid: timesteps T-1..lo+1, K times hi..lo+1,
    then lo..0; every row is the plain grid's row for its timestep except the K
    rows that land on x_lo and are followed by a jump to level hi: their mean
    coefficients times sqrt(r), sigma^2 -> r sigma^2 + 1 - r, r = abar_hi / abar_lo,
    computed here in Python floats from the betas."""
    d = GaussianDiffusion.cosine(T=20, variance="fixedsmall")
    lo, hi, K = 2, 12, 3
    base = make_plan(d, "ddpm")
    plan = make_plan(d, "ddpm", restart=(lo, hi, K))
    seg = list(range(hi, lo, -1))
    assert list(plan.timesteps) == list(range(19, lo, -1)) + seg * K + list(range(lo, -1, -1))
    assert plan.steps == 20 + K * (hi - lo) and plan.restart == (lo, hi, K)
    abar, prod = [], 1.0
    for b in d.betas.tolist():
        prod *= 1.0 - b
        abar.append(prod)
    r = abar[hi] / abar[lo]
    cols = {c: i for i, c in enumerate(reference.SAMPLER_COEFS)}
    jumps = 0
    for k, t in enumerate(plan.timesteps):
        row, plain = plan.table[k], base.table[19 - t]
        followed_by_jump = t == lo + 1 and jumps < K and k + 1 < plan.steps and plan.timesteps[k + 1] == hi
        if not followed_by_jump:
            assert torch.equal(row, plain), f"row {k} (t={t})"
            continue
        jumps += 1
        for c in ("c_x", "c_0"):
            assert abs(row[cols[c]].item() - math.sqrt(r) * plain[cols[c]].item()) < 1e-15
        assert abs(row[cols["sigma"]].item() ** 2 - (r * plain[cols["sigma"]].item() ** 2 + 1 - r)) < 1e-14
        for c in ("a_x", "a_e"):
            assert row[cols[c]].item() == plain[cols[c]].item()
    assert jumps == K
    assert "restart 2..12 x3" in plan.describe()


def test_restart_keeps_every_step_on_the_forward_marginals(one_thread):
    """With the exact network of a point mass x* (eps = (x - sqrt(abar) x*) / sqrt(1 - abar),
    so x0_hat = x*), each fixedsmall ancestral row maps q(x_t | x*) to q(x_{t-1} | x*)
    and each folded re-noising row to q(x_hi | x*): after every step of a restart plan
    the samples must have mean sqrt(abar_L) x* and std sqrt(1 - abar_L) at the level L
    the plan has reached (a jump row that did not re-noise would leave them at lo's
    std, 0.09 instead of 0.83 here)."""
    d = GaussianDiffusion.cosine(T=20, variance="fixedsmall")
    model = GaussianEps(d, MU, 0.0)
    plan = make_plan(d, "ddpm", restart=(2, 12, 3))
    abar = d.alphas_cumprod.double()
    n = N_EXACT
    state = sampling.StepState.allocate(plan, (n, *MU.shape), torch.device("cpu"))
    state.reset(3, 0)
    a0 = abar[plan.timesteps[0]]
    state.x.copy_((a0.sqrt() * MU + (1 - a0).sqrt() * torch.randn(n, *MU.shape, dtype=torch.float64)).float())
    with torch.no_grad():
        for k in range(plan.steps):
            sampling.denoise_step(model, state, "fp32", clip=True)
            x = state.x.double()
            if k + 1 == plan.steps:
                assert (x - MU).abs().max() < 1e-5
                break
            a = abar[plan.timesteps[k + 1]]
            sd = (1 - a).sqrt().item()
            err_mu = (x.mean(0) - a.sqrt() * MU).abs().max().item()
            err_s = abs(x.std(0).pow(2).mean().sqrt().item() / sd - 1)
            assert err_mu < 5 * sd / math.sqrt(n), f"step {k}: mean off by {err_mu:.4f} (std {sd:.3f})"
            assert err_s < 0.04, f"step {k} (to level {plan.timesteps[k + 1]}): std off by {err_s:.2%}"


@pytest.mark.parametrize("restart,match", [((2, 2, 1), "with lo < hi"), ((5, 2, 1), "with lo < hi"),
                                           ((0, 25, 1), "of the grid"), ((0, 9, 0), "restart count K"),
                                           ((0, 9), "three ints"), ((0.5, 9, 1), "three ints")])
def test_bad_restarts_are_refused(restart, match):
    d = GaussianDiffusion.cosine(T=20)
    with pytest.raises(ValueError, match=match):
        make_plan(d, "ddpm", restart=restart)
    with pytest.raises(ValueError, match="ddpm sampler only"):
        make_plan(d, "ddim", restart=(0, 9, 1))
    with pytest.raises(ValueError, match="199,800 network evaluations, more than 100,000"):
        make_plan(GaussianDiffusion.cosine(T=1000), "ddpm", restart=(0, 999, 200))
    with pytest.raises(ValueError, match="must be timesteps of the grid"):
        make_plan(d, "ddpm", steps=5, restart=(1, 9, 1))     # respaced: 1 and 9 are not on the grid
    for bad in (-0.1, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="threshold must be a quantile"):
            make_plan(d, "ddpm", threshold=bad)
    with pytest.raises(ValueError, match="needs clip=True"):
        sample(_model(), GaussianDiffusion.linear(T=10), 2, progress=False, threshold=0.9, clip=False)


def test_threshold_in_the_sampler_is_the_rescaled_clip(one_thread):
    """A sampling with threshold p equals one whose network output is rescaled by
    hand (x0_hat -> clamp(x0_hat, -s, s) / s, s = max(1, quantile_p |x0_hat|), with
    torch.quantile) before a plainly clipped step; and differs from plain clipping."""
    model, d = _model(), GaussianDiffusion.linear(T=10)
    plan = make_plan(d, "ddpm")
    p = 0.7

    class HandThresholded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.k = model, model.config, 0

        def forward(self, x, t):
            out = self.inner(x, t).double()
            row = plan.table[self.k].double()
            self.k += 1
            x0 = row[0] * x.double() - row[1] * out
            s = torch.quantile(x0.abs().flatten(1), p, dim=1).clamp(min=1).view(-1, 1, 1, 1)
            return ((row[0] * x.double() - x0.clamp(-s, s) / s) / row[1]).float()

    ours = sample(model, d, 4, seed=2, progress=False, threshold=p)
    hand = sample(HandThresholded(), d, 4, seed=2, progress=False)
    plain = sample(model, d, 4, seed=2, progress=False)
    assert (ours - hand).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-2


# ----------------------------------------------------------------------------- CLI


def _cli(tmp_path, *extra, T=10, model=None):
    model, d = model or _model(), GaussianDiffusion.linear(T=T)
    run = tmp_path / "run"
    if not run.exists():
        _write_ckpt(run / checkpoint.checkpoint_name(7), model, d)
    out = tmp_path / "out"
    sample_main(["--checkpoint", str(run), "--n", "5", "--out", str(out), "--batch-size", "2",
                 "--seed", "1", "--device", "cpu", "--no-progress", *extra])
    return model, d, out


@pytest.mark.parametrize("sampler,extra", [("ddpm", []), ("ddim", ["--steps", "4", "--eta", "0.5"]),
                                           ("dpmpp2m", ["--steps", "3", "--spacing", "uniform"])])
def test_sample_cli_end_to_end(tmp_path, capsys, sampler, extra):
    model, d, out = _cli(tmp_path, "--sampler", sampler, *extra)
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    img = Image.open(out / "samples.png")
    assert img.mode == "RGB" and img.width >= 8 * 3
    kw = {"sampler": sampler}
    if extra:
        kw.update(steps=int(extra[1]), **({"eta": 0.5} if sampler == "ddim" else {"spacing": "uniform"}))
    expect = sample(model, d, 5, batch_size=2, seed=1, progress=False, **kw)  # EMA weights are `model`
    assert np.array_equal(arr, ((expect + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    err = capsys.readouterr().err
    assert "EMA weights" in err and sampler in err
    assert sorted(os.listdir(out)) == ["samples.npz", "samples.png"]


def test_sample_cli_variance_flag(tmp_path):
    """--variance picks ddpm's sigma_t^2 (the checkpoint's fixedlarge is noisy at few steps)."""
    model, d, out = _cli(tmp_path, "--steps", "3", "--variance", "fixedsmall")
    arr = np.load(out / "samples.npz")["arr_0"]
    for variance, same in (("fixedsmall", True), ("fixedlarge", False)):
        x = sample(model, d, 5, batch_size=2, seed=1, progress=False, steps=3, variance=variance)
        u = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        assert np.array_equal(arr, u) == same, variance


def _cli_error(tmp_path, capsys, *args, code=2):
    with pytest.raises(SystemExit) as e:
        _cli(tmp_path, *args)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") or "error:" in err.splitlines()[-1]
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("args,match", [(["--sampler", "euler"], "invalid choice"), (["--steps", "0"], "--steps"),
                                        (["--steps", "11"], "--steps"), (["--sampler", "ddim", "--eta", "2"], "--eta"),
                                        (["--eta", "0.5"], "ddim only"), (["--seed", "-1"], "--seed"),
                                        (["--seed", str(2**64)], "--seed"), (["--device", "foo"], "not a device"),
                                        (["--device", "mps"], "cpu or cuda"), (["--device", "meta"], "cpu or cuda"),
                                        (["--restart", "3,2,1"], "--restart needs 0 <= LO < HI"),
                                        (["--restart", "0,9"], "--restart must be LO,HI,K"),
                                        (["--threshold", "1.5"], "--threshold must lie in (0, 1]"),
                                        (["--threshold", "0.9", "--no-clip"], "cannot go with --no-clip"),
                                        (["--sampler", "ddim", "--restart", "0,3,1"],
                                         "--restart: restart applies to the ddpm sampler only"),
                                        (["--restart", "0,30,1"], "--restart: restart's lo and hi must be")])
def test_sample_cli_bad_flags_are_one_line_errors(tmp_path, capsys, args, match):
    assert match in _cli_error(tmp_path, capsys, *args)


def test_sample_cli_restart_and_threshold(tmp_path, capsys):
    model, d, out = _cli(tmp_path, "--restart", "0,3,2", "--threshold", "0.9")
    arr = np.load(out / "samples.npz")["arr_0"]
    expect = sample(model, d, 5, batch_size=2, seed=1, progress=False, restart=(0, 3, 2), threshold=0.9)
    assert np.array_equal(arr, ((expect + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    err = capsys.readouterr().err
    assert "16 steps" in err and "restart 0..3 x2" in err and "dynamic threshold 0.9" in err
    assert "recorded" not in err


def test_sample_cli_takes_a_runs_recorded_restart_and_threshold(tmp_path, capsys):
    """A checkpoint whose training run recorded --sample-restart / --sample-threshold
    (config["train"]) samples with them by default, saying so; flags override them;
    another sampler or grid drops the restart (ddpm's full grid only), not the threshold."""
    model, d = _model(), GaussianDiffusion.linear(T=10)
    run = tmp_path / "run"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 7,
                            "config": {"model": CFG.to_dict(), "diffusion": d.config,
                                       "train": {"sample_restart": [0, 3, 2], "sample_threshold": 0.9}},
                            "model": model.state_dict(), "ema": model.state_dict()},
                           run / checkpoint.checkpoint_name(7))

    def check(args, note, **kw):
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        sample_main(["--checkpoint", str(run), "--n", "5", "--out", str(out), "--batch-size", "2", "--seed", "1",
                     "--device", "cpu", "--no-progress", *args])
        arr = np.load(out / "samples.npz")["arr_0"]
        expect = sample(model, d, 5, batch_size=2, seed=1, progress=False, **kw)
        assert np.array_equal(arr, ((expect + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
        err = capsys.readouterr().err
        assert (note in err) if note else ("recorded" not in err), err

    check([], "recorded --threshold 0.9 and --restart 0,3,2", restart=(0, 3, 2), threshold=0.9)
    check(["--restart", "none", "--threshold", "0"], None)
    check(["--restart", "1,5,1"], "recorded --threshold 0.9 (", restart=(1, 5, 1), threshold=0.9)
    check(["--sampler", "ddim", "--steps", "4"], "recorded --threshold 0.9 (", sampler="ddim", steps=4,
          threshold=0.9)
    check(["--no-clip"], "recorded --restart 0,3,2 (", restart=(0, 3, 2), clip=False)


MULTISTEP_CLI = [(["--sampler", "unipc", "--steps", "4", "--order", "2", "--variant", "bh1", "--spacing", "edm"],
                  dict(sampler="unipc", steps=4, order=2, variant="bh1", spacing="edm")),
                 (["--sampler", "ipndm", "--timesteps", "9,6,3,0", "--order", "3"],
                  dict(sampler="ipndm", timesteps=[9, 6, 3, 0], order=3)),
                 (["--sampler", "dpmpp3m", "--steps", "3", "--spacing", "trailing"],
                  dict(sampler="dpmpp3m", steps=3, spacing="trailing"))]


@pytest.mark.parametrize("args,kw", MULTISTEP_CLI, ids=["unipc", "ipndm", "dpmpp3m"])
def test_sample_cli_multistep_samplers(tmp_path, capsys, args, kw):
    """--sampler dpmpp3m / unipc / ipndm with --order, --variant, --spacing, --timesteps."""
    model, d, out = _cli(tmp_path, *args)
    arr = np.load(out / "samples.npz")["arr_0"]
    expect = sample(model, d, 5, batch_size=2, seed=1, progress=False, **kw)
    assert np.array_equal(arr, ((expect + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    assert kw["sampler"] in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--sampler", "unipc", "--order", "4"], "--order of unipc must lie in [1, 3]"),
    (["--sampler", "ipndm", "--order", "0"], "--order of ipndm must lie in [1, 4]"),
    (["--sampler", "ddim", "--order", "2"], "--order applies to --sampler unipc or ipndm only"),
    (["--sampler", "ipndm", "--variant", "bh1"], "--variant applies to --sampler unipc only"),
    (["--sampler", "unipc", "--steps", "2"], "--steps: unipc of order 3 needs at least 3 steps"),
    (["--sampler", "ipndm", "--timesteps", "9,5,1"], "--steps: ipndm of order 4 needs at least 4 steps"),
    (["--timesteps", "5,7"], "--timesteps: timesteps must be strictly decreasing"),
    (["--timesteps", "10,2"], "--timesteps: timesteps must lie in [0, 9]"),
    (["--timesteps", "9,x"], "--timesteps must be comma-separated integers"),
    (["--timesteps", "9,1", "--spacing", "edm"], "give --spacing or --timesteps"),
    (["--timesteps", "9,1", "--steps", "3"], "--timesteps: steps (3) must equal the number of timesteps (2)"),
    (["--spacing", "karras"], "invalid choice"), (["--sampler", "unipc", "--variant", "bh3"], "invalid choice")])
def test_sample_cli_bad_sampler_flags_name_the_option(tmp_path, capsys, args, match):
    assert match in _cli_error(tmp_path, capsys, *args)


@pytest.mark.parametrize("device", ["foo", "mps", "meta", "cuda:99"])
def test_sample_cli_bad_device_is_one_line(tmp_path, capsys, device):
    """Issue 10.8: --device foo / mps / meta gave tracebacks."""
    with pytest.raises(SystemExit) as e:
        sample_main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "o"), "--device", device])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --device {device}") and err.count("\n") == 1


@pytest.mark.parametrize("where", ["file", "under-file", "read-only"])
def test_sample_cli_bad_out_fails_before_sampling(tmp_path, capsys, monkeypatch, where):
    """Issue 10.8: a bad --out is reported at once, not after minutes of sampling."""
    calls = []
    monkeypatch.setattr("fastddpm.sample.sample", lambda *a, **k: calls.append(1))
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "sub", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):   # root ignores permissions: make the write test fail as EACCES would
            def denied(*a, **k):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr("fastddpm.files.tempfile.NamedTemporaryFile", denied)
    model, d = _model(), GaussianDiffusion.linear(T=4)
    _write_ckpt(tmp_path / "c.pt", model, d)
    with pytest.raises(SystemExit) as e:
        sample_main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: --out {out}: cannot write there") and "\n" not in err
    assert calls == []


def test_sample_cli_nan_weights_fail_and_write_nothing(tmp_path, capsys):
    """Issue 10.7: NaN weights used to give black images and a success message. The
    loader now refuses non-finite weights; finite weights that overflow (1e30 each) are
    what this check is left to catch."""
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e30)
    with pytest.raises(SystemExit) as e:
        _cli(tmp_path, "--steps", "2", model=model)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("error: the network produced non-finite outputs")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_sample_cli_memory_format(tmp_path, monkeypatch):
    """--memory-format moves the loaded network (auto: ops.preferred_memory_format);
    the samples agree up to uint8 rounding."""
    import shutil

    import fastddpm.sample as sample_mod

    seen, real = [], sample_mod.apply_memory_format

    def spy(model, name, device):
        fmt = real(model, name, device)
        seen.append((fmt, model.memory_format))
        return fmt

    monkeypatch.setattr(sample_mod, "apply_memory_format", spy)
    outs = {}
    for fmt in ("contiguous", "channels_last", "auto"):
        _, _, out = _cli(tmp_path, "--sampler", "ddim", "--steps", "3", "--memory-format", fmt)
        outs[fmt] = np.load(out / "samples.npz")["arr_0"].astype(int)
        shutil.rmtree(out)
    auto = ops.preferred_memory_format("cpu")
    assert seen == [(torch.contiguous_format,) * 2, (torch.channels_last,) * 2, (auto, auto)]
    assert np.abs(outs["contiguous"] - outs["channels_last"]).max() <= 1


def test_sample_cli_warns_about_fp16_on_cpu(tmp_path, capsys):
    _cli(tmp_path, "--precision", "fp16", "--sampler", "ddim", "--steps", "1")
    assert "warning: fp16 on the CPU" in capsys.readouterr().err


def test_sample_help_documents_reproducibility(capsys):
    with pytest.raises(SystemExit):
        sample_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "image i is drawn from the noise stream (--seed, i) alone" in text
    assert "--batch-size only how many are denoised at once" in text


# ----------------------------------------------------------------------------- checkpoints


def test_bare_state_dict_with_config_json(tmp_path):
    model, d = _model(), GaussianDiffusion.linear(T=4)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": CFG.to_dict(), "diffusion": d.config}))
    loaded, d2, _ = loader.load_for_sampling(tmp_path / "model.pt")
    assert d2.num_timesteps == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        loader.load_for_sampling(tmp_path / "nope.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        loader.load_for_sampling(tmp_path)
    model, d = _model(), GaussianDiffusion.linear(T=4)
    good = tmp_path / "good.pt"
    _write_ckpt(good, model, d)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="trunc.pt is unreadable"):
        loader.load_for_sampling(trunc)
    other = UNet(UNetConfig.tiny(image_size=8, ch=32, ch_mult=(1,), attn_resolutions=(8,), num_groups=4))
    ck = torch.load(good, weights_only=False)
    ck["ema"] = other.state_dict()
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="do not fit the model config"):
        loader.load_for_sampling(tmp_path / "other.pt")
    os.makedirs(tmp_path / "sub")
    torch.save({"x": torch.ones(1)}, tmp_path / "sub" / "m.pt")
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
        loader.load_for_sampling(tmp_path / "sub" / "m.pt")
    with pytest.raises(SystemExit, match="2"):  # bad input, as argparse's own errors
        sample_main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.atomic_save({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.atomic_save({"a": Boom()}, path)
    assert torch.load(path, weights_only=False) == {"a": 1}
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind


# ----------------------------------------------------------------------------- GPU: the CUDA-graph runner


def _gpu_model():
    return _model().cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,steps,extra", [("ddpm", 12, {}), ("ddim", 6, {}), ("dpmpp2m", 6, {}),
                                                 ("dpmpp3m", 6, {}), ("unipc", 6, {}), ("ipndm", 6, {}),
                                                 ("ddpm", 12, {"restart": (0, 5, 2), "threshold": 0.9}),
                                                 ("dpmpp2m", 6, {"threshold": 0.9})])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_graphed_equals_eager(sampler, steps, extra, precision):
    """Bit-identical: a replay runs the kernels of one eager step on the same buffers
    (the dynamic threshold's sort included)."""
    model, d = _gpu_model(), GaussianDiffusion.linear(T=12)
    kw = dict(progress=False, sampler=sampler, steps=steps, precision=precision, batch_size=3, **extra)
    graphed = sample(model, d, 5, seed=2, cuda_graphs=True, **kw)     # batches of 3 and 2: two graphs
    eager = sample(model, d, 5, seed=2, cuda_graphs=False, **kw)
    assert torch.equal(graphed, eager)
    # and the CUDA path agrees with the CPU one (same Philox stream) up to float rounding
    cpu = sample(model.cpu(), d.cpu(), 5, seed=2, **{**kw, "precision": "fp32"})
    if precision == "fp32":
        torch.testing.assert_close(eager, cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_replays_draw_fresh_noise_and_cache_is_bounded():
    model, d = _gpu_model(), GaussianDiffusion.linear(T=8)
    plan = make_plan(d, "ddpm")
    runner = CudaGraphRunner(max_graphs=2)
    kw = dict(plan=plan, device="cuda", progress=False, runner=runner)
    a = sample_batch(model, d, 4, 0, **kw)
    b = sample_batch(model, d, 4, 0, first_sample=4, **kw)   # same graph, next images
    c = sample_batch(model, d, 4, 1, **kw)                   # same graph, another seed
    assert len(runner) == 1
    assert (a - b).abs().amax() > 1e-2 and (a - c).abs().amax() > 1e-2
    assert torch.equal(a, sample_batch(model, d, 4, 0, **kw))
    # each replay advanced the offset on the device: the steps drew different noise
    state = runner._cache[next(iter(runner._cache))][1]
    assert int(state.step) == plan.steps and int(state.rng[1]) == plan.steps + 1
    for n in (1, 2, 3):
        sample_batch(model, d, n, 0, **kw)
    assert len(runner) == 2


@pytest.mark.gpu
def test_gpu_step_has_no_host_sync():
    model, d = _gpu_model(), GaussianDiffusion.linear(T=8)
    for sampler in sampling.SAMPLERS:
        plan = make_plan(d, sampler, 4)
        state = sampling.StepState.allocate(plan, (2, 3, 8, 8), torch.device("cuda"))
        state.reset(0, 0)
        with torch.no_grad():
            sampling.denoise_step(model, state, "bf16", True)          # warm-up (kernel compilation)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                sampling.denoise_step(model, state, "bf16", True)
            finally:
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_runner_kept_across_sample_calls():
    """A runner passed to sample() keeps its graphs: the second call captures nothing
    and gives the same images; a model whose tensors moved is captured afresh."""
    model, d = _gpu_model(), GaussianDiffusion.linear(T=8)
    runner = CudaGraphRunner()
    kw = dict(progress=False, sampler="unipc", steps=4, batch_size=4, cuda_graphs=runner)
    a = sample(model, d, 4, seed=3, **kw)
    entry = runner._cache[next(iter(runner._cache))]
    assert torch.equal(a, sample(model, d, 4, seed=3, **kw)) and len(runner) == 1
    assert runner._cache[next(iter(runner._cache))] is entry
    moved = _gpu_model()
    sample(moved, d, 4, seed=3, **kw)
    assert len(runner) == 2


@pytest.mark.gpu
def test_gpu_capture_failure_falls_back(monkeypatch, capsys):
    model, d = _gpu_model(), GaussianDiffusion.linear(T=6)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(torch.cuda, "graph", oom)
    out = sample(model, d, 2, seed=1, progress=False)
    assert "cuda graphs: capture failed (OutOfMemoryError" in capsys.readouterr().err
    monkeypatch.undo()
    assert torch.equal(out, sample(model, d, 2, seed=1, progress=False, cuda_graphs=False))
