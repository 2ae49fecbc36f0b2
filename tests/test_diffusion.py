"""GaussianDiffusion against an independent float64 implementation of the paper's formulas."""
import math

import pytest
import torch

from fastddpm import GaussianDiffusion
from fastddpm.diffusion import make_betas


def paper_schedule(T=1000, b0=1e-4, b1=0.02):
    """Element by element in Python floats: an implementation independent of numpy's."""
    betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    post_var = [betas[i] * (1 - abar_prev[i]) / (1 - abar[i]) for i in range(T)]
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": [math.sqrt(a) for a in abar],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1 - a) for a in abar],
        "sqrt_recip_alphas_cumprod": [1 / math.sqrt(a) for a in abar],
        "sqrt_recipm1_alphas_cumprod": [math.sqrt(1 / a - 1) for a in abar],
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": [math.log(post_var[1])] + [math.log(v) for v in post_var[1:]],
        "posterior_mean_coef1": [betas[i] * math.sqrt(abar_prev[i]) / (1 - abar[i]) for i in range(T)],
        "posterior_mean_coef2": [(1 - abar_prev[i]) * math.sqrt(1 - betas[i]) / (1 - abar[i]) for i in range(T)],
        "fixedlarge": [math.log(post_var[1])] + [math.log(b) for b in betas[1:]],
    }


@pytest.fixture(scope="module")
def d():
    return GaussianDiffusion.linear(T=1000, beta_start=1e-4, beta_end=0.02, variance="fixedlarge")


def test_schedule_matches_paper_formulas(d):
    ref = paper_schedule()
    for name, values in ref.items():
        buf = d.model_log_variance if name == "fixedlarge" else getattr(d, name)
        assert buf.dtype == torch.float64 and buf.shape == (1000,)
        err = (buf - torch.tensor(values, dtype=torch.float64)).abs().max().item()
        assert err < 1e-12, f"{name}: max abs error {err}"
    assert d.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert d.betas[-1].item() == pytest.approx(0.02, abs=1e-15)


def test_fixedsmall_is_clipped_posterior(d):
    small = GaussianDiffusion.linear(variance="fixedsmall")
    assert torch.equal(small.model_log_variance, small.posterior_log_variance_clipped)
    assert not torch.equal(small.model_log_variance, d.model_log_variance)


def test_quad_and_cosine_schedules():
    q = make_betas("quad", 10, 1e-4, 0.02)
    assert q[0] == pytest.approx(1e-4) and q[-1] == pytest.approx(0.02)
    assert all(q[i] < q[i + 1] for i in range(9))
    c = GaussianDiffusion.cosine(T=50)
    assert c.num_timesteps == 50 and c.betas.max() <= 0.999
    s = 0.008
    f = lambda u: math.cos((u / 50 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert c.alphas_cumprod[10].item() == pytest.approx(f(11) / f(0), rel=1e-9)


def test_buffers_move_with_to():
    d = GaussianDiffusion.linear(T=10)
    names = [n for n, _ in d.named_buffers()]
    assert "sqrt_alphas_cumprod" in names and "model_log_variance" in names
    d.to("meta")
    assert all(b.device.type == "meta" and b.dtype == torch.float64 for b in d.buffers())
    assert d.state_dict() == {}  # rebuilt from the config, never loaded


def test_q_sample_matches_closed_form(d):
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 250, 998, 999])
    ref = paper_schedule()
    xt = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        expect = math.sqrt(ref["alphas_cumprod"][ti]) * x0[i] + math.sqrt(1 - ref["alphas_cumprod"][ti]) * noise[i]
        assert torch.allclose(xt[i], expect, rtol=0, atol=1e-12)


def test_q_sample_moments(d):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=g) * 2 - 1
    n = 20000
    t = torch.full((n,), 300, dtype=torch.long)
    xs = d.q_sample(x0.expand(n, -1, -1, -1).contiguous(), t,
                    torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=g))
    abar = d.alphas_cumprod[300].item()
    mean_err = (xs.mean(0) - math.sqrt(abar) * x0[0]).abs().max().item()
    var_err = (xs.var(0) - (1 - abar)).abs().max().item()
    assert mean_err < 5 * math.sqrt((1 - abar) / n) * 4
    assert var_err < 0.05 * (1 - abar)


def test_posterior_consistent_with_forward_process(d):
    # Bayes: q(x_{t-1} | x_t, x0) from q_sample's joint. Check the mean and variance
    # against the Gaussian conditioning formula computed independently.
    x0 = torch.rand(4, 2, 3, 3, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 500, 999])
    x_t = d.q_sample(x0, t, torch.randn_like(x0))
    mean, var, logvar = d.q_posterior(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        a_prev = d.alphas_cumprod[ti - 1].item()
        alpha = 1 - d.betas[ti].item()
        # prior x_{t-1} ~ N(sqrt(a_prev) x0, 1 - a_prev); x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta)
        prec = 1 / (1 - a_prev) + alpha / d.betas[ti].item()
        m = (math.sqrt(a_prev) * x0[i] / (1 - a_prev) + math.sqrt(alpha) * x_t[i] / d.betas[ti].item()) / prec
        assert torch.allclose(mean[i], m, atol=1e-10)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-10)
        assert logvar[i].item() == pytest.approx(math.log(1 / prec), rel=1e-10)


def test_predict_x0_inverts_q_sample(d):
    x0 = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 400, 999])
    assert torch.allclose(d.predict_x0(d.q_sample(x0, t, eps), t, eps), x0, atol=1e-9)


def test_p_mean_variance_is_posterior_of_clipped_x0(d):
    x_t = torch.randn(3, 3, 4, 4, dtype=torch.float64) * 2
    eps = torch.randn_like(x_t)
    t = torch.tensor([0, 5, 999])
    mean, var, logvar = d.p_mean_variance(eps, x_t, t, clip=True)
    x0 = d.predict_x0(x_t, t, eps).clamp(-1, 1)
    expect, _, _ = d.q_posterior(x0, x_t, t)
    assert torch.allclose(mean, expect, atol=1e-12)
    assert torch.allclose(logvar.flatten(), d.model_log_variance[t])
    assert torch.allclose(var.flatten(), d.model_log_variance[t].exp())


def test_p_sample_step_adds_noise_only_for_t_above_zero(d):
    x_t = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x_t)
    t = torch.tensor([0, 0, 1, 700])
    a = d.p_sample_step(x_t, t, eps, noise=torch.randn_like(x_t))
    b = d.p_sample_step(x_t, t, eps, noise=torch.randn_like(x_t))
    mean, _, logvar = d.p_mean_variance(eps, x_t, t)
    assert torch.equal(a[:2], b[:2])
    assert torch.allclose(a[:2], mean[:2], atol=1e-12)
    assert not torch.allclose(a[2:], b[2:])
    z = torch.randn_like(x_t)
    c = d.p_sample_step(x_t, t, eps, noise=z)
    assert torch.allclose(c[2:], mean[2:] + (0.5 * logvar[2:]).exp() * z[2:], atol=1e-12)


def test_training_loss_is_l_simple(d):
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([3, 100, 500, 999])
    noise = torch.randn_like(x0)
    model = lambda x, tt: 0.5 * x + tt.float()[:, None, None, None] * 1e-3  # noqa: E731
    loss = d.training_loss(model, x0, t, noise)
    expect = ((noise - model(d.q_sample(x0, t, noise), t)) ** 2).mean()
    assert loss.shape == () and loss.item() == pytest.approx(expect.item(), rel=1e-6)
    # t drawn uniformly when not given
    g = torch.Generator().manual_seed(0)
    seen = []
    d.training_loss(lambda x, tt: seen.append(tt) or torch.zeros_like(x), torch.zeros(4000, 1, 1, 1) + 0.1,
                    generator=g)
    assert seen[0].min() >= 0 and seen[0].max() <= 999 and seen[0].float().std() > 250


def test_nll_bpd_is_sum_of_terms_and_finite():
    d = GaussianDiffusion.linear(T=8)
    x0 = (torch.randint(0, 256, (3, 3, 4, 4)).float() / 127.5 - 1)
    model = lambda x, t: 0.9 * x  # noqa: E731
    g = torch.Generator().manual_seed(0)
    r = d.vlb_terms(model, x0, generator=g)
    assert r["terms"].shape == (3, 8) and r["prior"].shape == (3,)
    assert torch.isfinite(r["total"]).all() and (r["terms"] >= 0).all()
    assert torch.allclose(r["total"], r["prior"] + r["terms"].sum(1), atol=0, rtol=1e-12)
    nll = d.nll_bpd(model, x0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(nll, r["total"], rtol=1e-12)


def test_decoder_term_is_discretized_gaussian():
    # At t == 0 the term is -log of the probability mass of x0's bin under
    # N(mean, sigma^2), computed here with the exact normal CDF (the code uses
    # the paper's tanh approximation: agreement to ~1e-2 relative).
    d = GaussianDiffusion.linear(T=4)
    torch.manual_seed(0)
    x0 = torch.tensor([[[[0.0 / 127.5 - 1, 128 / 127.5 - 1], [200 / 127.5 - 1, 1.0]]]])
    x_t = x0 + 0.01 * torch.randn_like(x0)
    t = torch.zeros(1, dtype=torch.long)
    eps = torch.randn_like(x0)
    term = d.vb_term_bpd(lambda x, tt: eps, x0, x_t, t).item()
    mean, _, logvar = d.p_mean_variance(eps, x_t, t)
    sd = math.exp(0.5 * logvar.item())
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    nats = 0.0
    for x, m in zip(x0.flatten().tolist(), mean.flatten().tolist()):
        hi = 1.0 if x > 0.999 else Phi((x + 1 / 255 - m) / sd)
        lo = 0.0 if x < -0.999 else Phi((x - 1 / 255 - m) / sd)
        nats -= math.log(max(hi - lo, 1e-12))
    assert term == pytest.approx(nats / 4 / math.log(2), rel=1e-2)


@pytest.mark.parametrize("bad_t, err", [
    (torch.tensor([0, 1000]), "lie in \\[0, 999\\]"),
    (torch.tensor([-1, 5]), "lie in \\[0, 999\\]"),
    (torch.tensor([0.0, 1.0]), "int64"),
    (torch.tensor([1, 2, 3]), "shape \\(2,\\)"),
    (5, "int64 tensor"),
])
def test_bad_timesteps_are_refused(d, bad_t, err):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises((ValueError, TypeError), match=err):
        d.q_sample(x, bad_t, torch.randn_like(x))


def test_bad_inputs_are_refused(d):
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="noise has shape"):
        d.q_sample(x, t, torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        d.q_sample(x, t, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        d.q_sample(x.long(), t, x)
    with pytest.raises(ValueError, match="eps has shape"):
        d.p_sample_step(x, t, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="unknown schedule"):
        GaussianDiffusion.from_schedule("sigmoid")
    with pytest.raises(ValueError, match="unknown variance"):
        GaussianDiffusion.linear(variance="learned")
    with pytest.raises(ValueError, match="model output has shape"):
        d.training_loss(lambda x, tt: x[:, :1], x, t)


def test_config_round_trip(d):
    d2 = GaussianDiffusion.from_config(d.config)
    assert torch.equal(d2.model_log_variance, d.model_log_variance)
    custom = GaussianDiffusion([0.1, 0.2, 0.3], variance="fixedsmall")
    assert torch.equal(GaussianDiffusion.from_config(custom.config).betas, custom.betas)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_of_range_t_is_refused_once_on_every_backend(backend, monkeypatch):
    """GaussianDiffusion checks t itself, then calls the ops with check_range=False:
    one host read of t per call, on every backend; an out-of-range t never reaches a kernel."""
    import fastddpm.ops as ops
    from fastddpm.ops import _checks

    d = GaussianDiffusion.linear(T=10)
    x = torch.randn(2, 3, 4, 4)
    reads = []
    original = _checks.no_sync
    monkeypatch.setattr(_checks, "no_sync", lambda: reads.append(1) or original())
    with ops.use_backend(backend):
        for bad in (10, -1):
            t = torch.tensor([1, bad])
            with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"):
                d.q_sample(x, t, torch.randn_like(x))
            with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"):
                d.p_sample_step(x, t, torch.randn_like(x), torch.randn_like(x))
        reads.clear()
        d.q_sample(x, torch.tensor([0, 9]), torch.randn_like(x))
        d.p_sample_step(x, torch.tensor([0, 9]), torch.randn_like(x), torch.randn_like(x))
    assert len(reads) == 2
