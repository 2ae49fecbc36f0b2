"""The yardstick of the sampler-accuracy benchmark (benchmarks/test_sampler_accuracy.py):
a data law whose optimal eps is known in closed form, its exact samples, a
mode-balanced sliced Wasserstein distance, and an accurate probability-flow ODE
solution to compare deterministic samplers with.

The law: K equally likely isotropic Gaussians N(mu_k, s^2 I) in image shape,
the means uniform in [-spread, spread]^d (inside [-1, 1] with a margin of many
s, so clipping x0_hat never matters). Under the forward process
x_t = alpha x0 + sigma eps (alpha^2 = abar, sigma^2 = 1 - abar) x_t is the
mixture of N(alpha mu_k, v I), v = abar s^2 + sigma^2, and the optimal
eps_hat(x_t) = E[eps | x_t] = -sigma grad log p_t(x_t) is

    eps*(x, abar) = sigma / v * (x - alpha sum_k r_k(x) mu_k),
    r = softmax_k(alpha <x, mu_k> / v - abar |mu_k|^2 / (2 v))    (log-sum-exp)

finite at every abar in (0, 1] (it is 0 at abar = 1). tests/test_gaussian_mixture.py
checks it against autograd of the log-density.
"""
import math

import torch

F64 = torch.float64


class GaussianMixture:
    """K isotropic Gaussians of std `std` in `shape`, equal weights; float64."""

    def __init__(self, modes=16, shape=(3, 8, 8), std=0.1, spread=0.6, seed=0):
        self.shape = tuple(shape)
        self.dim = math.prod(self.shape)
        self.std = float(std)
        g = torch.Generator().manual_seed(seed)
        self.means = (torch.rand(modes, self.dim, generator=g, dtype=F64) * 2.0 - 1.0) * spread   # (K, d)
        self.mean_sq = (self.means ** 2).sum(1)                                                   # (K,)

    @property
    def modes(self):
        return self.means.shape[0]

    def _parts(self, x, abar):
        """x (B, d) float64, abar (B,) float64 -> alpha, sigma, v (B, 1) and the
        responsibilities r (B, K)."""
        abar = abar.reshape(-1, 1)
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        v = abar * self.std ** 2 + (1.0 - abar)
        logits = (alpha * (x @ self.means.T) - 0.5 * abar * self.mean_sq) / v
        return alpha, sigma, v, torch.softmax(logits, dim=1)

    def eps(self, x, abar):
        """Optimal eps at x (B, *shape) (any float dtype) and abar: a number or (B,)
        per sample. Returns (B, *shape) float64."""
        xf = x.reshape(x.shape[0], -1).to(F64)
        abar = torch.as_tensor(abar, dtype=F64).expand(x.shape[0])
        alpha, sigma, v, r = self._parts(xf, abar)
        return (sigma / v * (xf - alpha * (r @ self.means))).reshape(x.shape)

    def log_density(self, x, abar):
        """log p_t(x) of the noised law at abar (a number), x (B, *shape) float64 -> (B,)."""
        xf = x.reshape(x.shape[0], -1)
        alpha = math.sqrt(abar)
        v = abar * self.std ** 2 + (1.0 - abar)
        sq = ((xf[:, None, :] - alpha * self.means[None]) ** 2).sum(-1)                # (B, K)
        return torch.logsumexp(-sq / (2 * v), dim=1) - math.log(self.modes) - 0.5 * self.dim * math.log(2 * math.pi * v)

    def sample(self, n, generator, labels=None):
        """n exact samples (n, *shape) float64 and their modes (n,); labels: the
        modes to use (else drawn uniformly)."""
        if labels is None:
            labels = torch.randint(self.modes, (n,), generator=generator)
        x = self.means[labels] + self.std * torch.randn(n, self.dim, generator=generator, dtype=F64)
        return x.reshape(n, *self.shape), labels

    def nearest_mode(self, x):
        """The nearest mean's index per sample, x (B, *shape) -> (B,) int64."""
        xf = x.reshape(x.shape[0], -1).to(F64)
        return (xf @ self.means.T - 0.5 * self.mean_sq).argmax(1)

    def mode_weights(self, x):
        """Weights that give every mode the samples fall in the same total mass
        (each sample 1 / (modes hit * samples of its nearest mode)), and the mode
        proportions' total-variation distance from uniform."""
        lab = self.nearest_mode(x)
        counts = torch.bincount(lab, minlength=self.modes).to(F64)
        hit = int((counts > 0).sum())
        tv = 0.5 * (counts / len(lab) - 1.0 / self.modes).abs().sum().item()
        return 1.0 / (hit * counts[lab]), tv


def directions(dim, count, seed=0):
    """`count` random unit vectors in R^dim, (dim, count) float64."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(dim, count, generator=g, dtype=F64)
    return d / d.norm(dim=0, keepdim=True)


def weighted_quantiles(x, weights, dirs, levels):
    """Quantile functions of the weighted samples x (n, *shape) projected on each
    direction, at `levels` (Q,) in (0, 1): (P, Q)."""
    proj = (x.reshape(x.shape[0], -1).to(F64) @ dirs).T                           # (P, n)
    vals, order = proj.sort(dim=1)
    cw = torch.cumsum(weights.to(F64)[order], dim=1)
    cw = cw / cw[:, -1:]
    idx = torch.searchsorted(cw, levels.expand(cw.shape[0], -1).contiguous()).clamp_max(x.shape[0] - 1)
    return vals.gather(1, idx)


def sliced_w1(q1, q2):
    """Sliced 1-Wasserstein distance from quantile tables (P, Q) on midpoint levels:
    the mean over directions of the integral of |F1^-1 - F2^-1|."""
    return (q1 - q2).abs().mean().item()


def quantile_levels(count):
    return (torch.arange(count, dtype=F64) + 0.5) / count


def abar_of_sigma(s):
    """abar of the EDM noise level s = sigma / alpha: 1 / (1 + s^2)."""
    return 1.0 / (1.0 + s * s)


def probability_flow(law, x_T, sigma_max, steps):
    """Solve the probability-flow ODE from x_T (taken as x at EDM noise level
    sigma_max = sqrt((1 - abar) / abar)) to sigma = 0 in float64: with
    y = x / alpha, dy/dsigma = eps*(alpha y, abar(sigma)). Classical RK4 in u,
    sigma(u) = (sigma_max^(1/7) (1 - u))^7 (EDM's rho = 7 warp: small steps at low
    noise, where the modes' curvature lives; dsigma/du -> 0 at sigma = 0, so the
    integrand stays smooth to the end). Returns x at sigma = 0 (abar = 1), float64."""
    rho = 7.0
    root = sigma_max ** (1.0 / rho)

    def sig(u):
        return (root * (1.0 - u)) ** rho

    def f(u, y):
        s = sig(u)
        dsdu = -rho * root * (root * (1.0 - u)) ** (rho - 1.0)
        ab = abar_of_sigma(s)
        return law.eps(y * math.sqrt(ab), ab) * dsdu

    y = x_T.to(F64) * math.sqrt(1.0 + sigma_max ** 2)
    h = 1.0 / steps
    for i in range(steps):
        u = i * h
        k1 = f(u, y)
        k2 = f(u + h / 2, y + h / 2 * k1)
        k3 = f(u + h / 2, y + h / 2 * k2)
        k4 = f(u + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y
