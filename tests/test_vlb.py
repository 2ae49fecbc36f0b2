"""The variational bound against closed forms written here in float64, independently
of fastddpm.diffusion: normal_kl (and torch.distributions' KL), the prior term, each
KL term, the decoder term (the formula of the paper's code), and the whole
nll_bpd of a fixed tiny network against a loop over t written out in this file."""
import math

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion
from fastddpm.diffusion import normal_kl
from _util import rel_err

T = 20
LN2 = math.log(2.0)


def _schedule(T, variance):
    """Linear betas 1e-4 .. 0.02 and everything the bound needs, float64 numpy."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # the paper's code: index 0's posterior log-variance is index 1's ("clipped");
    # fixedlarge's model variance is beta_t except at index 0 (the posterior's at 1)
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    model_var = np.concatenate([[post_var[1]], betas[1:]]) if variance == "fixedlarge" else np.exp(post_logvar)
    return dict(betas=betas, abar=abar, abar_prev=abar_prev, post_logvar=post_logvar, model_var=model_var)


def _kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) per element, nats, from the variances."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def _posterior_mean(s, x0, xt, t):
    a, ap, b = s["abar"][t], s["abar_prev"][t], s["betas"][t]
    return np.sqrt(ap) * b / (1 - a) * x0 + np.sqrt(1 - b) * (1 - ap) / (1 - a) * xt


def _paper_decoder_nll(x, mean, log_scale):
    """-log p(x0 | x1) per element (nats): diffusion_utils_2.py's
    discretized_gaussian_log_likelihood (the tanh CDF approximation, edge bins open)."""
    def cdf(v):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))
    inv = np.exp(-log_scale)
    plus, minus = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    logp = np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                             np.log(np.maximum(plus - minus, 1e-12))))
    return -logp


def _term(s, x0, xt, t, eps, clip=True):
    """One VLB term of one image, bits/dim: decoder NLL at t == 0, else the KL."""
    x0_hat = (xt - np.sqrt(1 - s["abar"][t]) * eps) / np.sqrt(s["abar"][t])
    if clip:
        x0_hat = np.clip(x0_hat, -1, 1)
    mean = _posterior_mean(s, x0_hat, xt, t)
    if t == 0:
        return _paper_decoder_nll(x0, mean, 0.5 * np.log(s["model_var"][0])).mean() / LN2
    true_mean = _posterior_mean(s, x0, xt, t)
    return _kl(true_mean, np.exp(s["post_logvar"][t]), mean, s["model_var"][t]).mean() / LN2


def _images(B=3, shape=(3, 4, 4)):
    """Quantised images in [-1, 1] with both edge bins present."""
    x = torch.randint(0, 256, (B, *shape)).double() / 127.5 - 1
    x.view(B, -1)[:, 0], x.view(B, -1)[:, 1] = -1.0, 1.0
    return x


def test_normal_kl_is_the_gaussian_kl():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    got = normal_kl(m1, lv1, m2, lv2)
    want = _kl(m1.numpy(), np.exp(lv1.numpy()), m2.numpy(), np.exp(lv2.numpy()))
    assert rel_err(got, torch.from_numpy(want)) < 1e-12
    N = torch.distributions.Normal
    outside = torch.distributions.kl_divergence(N(m1, (0.5 * lv1).exp()), N(m2, (0.5 * lv2).exp()))
    assert rel_err(got, outside) < 1e-12
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


def test_prior_term_is_the_kl_to_the_standard_normal():
    d, s = GaussianDiffusion.linear(T=T), _schedule(T, "fixedlarge")
    x0 = _images()
    a = s["abar"][-1]
    want = [_kl(np.sqrt(a) * x.numpy(), 1 - a, 0.0, 1.0).mean() / LN2 for x in x0]
    assert rel_err(d.prior_bpd(x0), torch.tensor(want)) < 1e-12


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_every_term_is_its_closed_form(variance):
    """vb_term_bpd at every t (the decoder at 0, the KL elsewhere) for a random
    eps_hat, x0_hat clipped or not (some of it falls outside [-1, 1])."""
    d, s = GaussianDiffusion.linear(T=T, variance=variance), _schedule(T, variance)
    x0 = _images()
    for t in range(T):
        xt = d.q_sample(x0, torch.full((3,), t), torch.randn_like(x0))
        eps = torch.randn_like(x0)
        for clip in (True, False):
            got = d.vb_term_bpd(lambda x, tt: eps, x0, xt, torch.full((3,), t), clip=clip)
            want = [_term(s, x0[b].numpy(), xt[b].numpy(), t, eps[b].numpy(), clip) for b in range(3)]
            # the bound is computed in float32 (as the paper's code): each term to ~1e-6
            assert rel_err(got, torch.tensor(want)) < 2e-5, f"t={t} clip={clip}: {rel_err(got, torch.tensor(want)):.2e}"


class _FixedNet(torch.nn.Module):
    """A fixed network whose x0_hat is a t-dependent image c_t (partly outside
    [-1, 1], so clipping matters): eps = (x_t - sqrt(abar_t) c_t) / sqrt(1 - abar_t).
    Then every term of the bound is independent of the noise draws, so the whole
    nll_bpd has an exact value to compare with."""

    def __init__(self, abar, c0, c1):
        super().__init__()
        self.abar, self.c0, self.c1 = abar, c0, c1

    def c(self, t):
        return self.c0 + (t / T) * self.c1

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.c(t.double().view(-1, 1, 1, 1))) / (1 - a).sqrt()


def test_nll_bpd_of_a_fixed_network_equals_a_float64_loop():
    d, s = GaussianDiffusion.linear(T=T), _schedule(T, "fixedlarge")
    x0 = _images()
    c0, c1 = 0.6 * torch.randn(3, 4, 4, dtype=torch.float64), 0.8 * torch.randn(3, 4, 4, dtype=torch.float64)
    net = _FixedNet(torch.from_numpy(s["abar"]), c0, c1)
    out = d.vlb_terms(net, x0, generator=torch.Generator().manual_seed(5))
    want_terms = np.zeros((3, T))
    for b in range(3):
        for t in range(T):
            x0_hat = np.clip(c0.numpy() + (t / T) * c1.numpy(), -1, 1)
            mean = _posterior_mean(s, x0_hat, 0.0, t)          # x_t's coefficient cancels in the KL
            if t == 0:
                nll = _paper_decoder_nll(x0[b].numpy(), mean, 0.5 * np.log(s["model_var"][0]))
                want_terms[b, t] = nll.mean() / LN2
            else:
                true_mean = _posterior_mean(s, x0[b].numpy(), 0.0, t)
                want_terms[b, t] = _kl(true_mean, np.exp(s["post_logvar"][t]), mean, s["model_var"][t]).mean() / LN2
    a = s["abar"][-1]
    prior = np.array([_kl(np.sqrt(a) * x.numpy(), 1 - a, 0.0, 1.0).mean() / LN2 for x in x0])
    want_total = prior + want_terms.sum(1)
    assert rel_err(out["prior"], torch.from_numpy(prior)) < 1e-12
    for t in range(T):
        assert rel_err(out["terms"][:, t], torch.from_numpy(want_terms[:, t])) < 2e-5, f"term t={t}"
    assert rel_err(d.nll_bpd(net, x0), torch.from_numpy(want_total)) < 1e-5
    assert want_total.min() > 0.5     # a real bound, not a vanishing one
