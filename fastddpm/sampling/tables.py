"""Samplers as float64 coefficient tables: one row per network evaluation.

A plan for N steps holds N distinct decreasing timesteps tau_0 > ... > tau_{N-1}
(the network is evaluated at each) and an (N, 6) table whose row i takes x at
tau_i to x at tau_{i+1} (row N-1: to abar = 1, a clean sample, no noise), in
the form every sampler shares (reference.SAMPLER_COEFS):
    x0_hat = a_x x - a_e eps                      (clipped to [-1, 1] if clip)
    x_next = c_x x + c_0 x0_hat + c_p x0_prev + sigma z
With abar_i = alphas_cumprod[tau_i] and abar_N = 1, a_x = sqrt(1/abar_i) and
a_e = sqrt(1/abar_i - 1) for every sampler, and:

* ddpm (Ho et al. 2020; respaced as Nichol & Dhariwal 2021): betas recomputed
  from the kept abar, beta_i = 1 - abar_i / abar_{i+1}; c_0, c_x are the
  posterior-mean coefficients beta_i sqrt(abar_{i+1}) / (1 - abar_i) and
  (1 - abar_{i+1}) sqrt(1 - beta_i) / (1 - abar_i); sigma^2 is beta_i
  ("fixedlarge", the posterior variance at the last kept step) or the
  posterior variance ("fixedsmall"); no noise in the last row. Over all T
  steps this is the paper's ancestral sampler.
* ddim (Song et al. 2021, eq. 12 with eps recomputed from the clipped x0_hat):
  sigma = eta sqrt((1 - abar_{i+1}) / (1 - abar_i)) sqrt(1 - abar_i / abar_{i+1}),
  d = sqrt(1 - abar_{i+1} - sigma^2), c_x = d / sqrt(1 - abar_i),
  c_0 = sqrt(abar_{i+1}) - d sqrt(abar_i) / sqrt(1 - abar_i).
* dpmpp2m (Lu et al. 2022, DPM-Solver++(2M), data prediction): with
  alpha = sqrt(abar), s = sqrt(1 - abar), lambda = log(alpha / s),
  h_i = lambda_{i+1} - lambda_i and r_i = h_{i-1} / h_i:
  c_x = s_{i+1} / s_i, and with phi = 1 - e^{-h_i}: c_0 = alpha_{i+1} phi
  (1 + 1/(2 r_i)), c_p = -alpha_{i+1} phi / (2 r_i); first order
  (c_0 = alpha_{i+1} phi, c_p = 0) in the first row, and the last row (to
  lambda = inf) is x_next = x0_hat. No noise.

Timestep spacing (N network evaluations at exactly N distinct timesteps):
"uniform" tau = floor(k T / N), k = 0..N-1 (DDIM's range(0, T, T // N) when N
divides T); "quadratic" floor((k / (N - 1))^2 * 0.8 T), the DDIM paper's
CIFAR-10 choice; "logsnr" the timesteps nearest to N values of lambda =
log(alpha / sigma) uniform from lambda(T-1) to lambda(0), DPM-Solver's choice
for low-resolution images (a multistep solver extrapolates badly across the
very unequal lambda steps of the other two). Quadratic and logsnr timesteps are
made strictly increasing (a repeated value moves up by one, values stay below
T), so that N steps are N distinct timesteps. Default per sampler
(DEFAULT_SPACING): ddpm uniform, ddim quadratic, dpmpp2m logsnr.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from fastddpm.reference import SAMPLER_COEFS

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
SPACINGS = ("uniform", "quadratic", "logsnr")
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "quadratic", "dpmpp2m": "logsnr"}
VARIANCES = ("fixedlarge", "fixedsmall")


@dataclass(frozen=True)
class SamplerPlan:
    """What a sampler runs: `timesteps` (N,) the network's t per step (decreasing),
    `table` (N, 6) float64 coefficients (SAMPLER_COEFS), `multistep` whether a
    step reads the previous x0_hat."""
    sampler: str
    timesteps: tuple
    table: torch.Tensor
    multistep: bool
    eta: float
    spacing: str
    variance: str

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        """Whether any step adds noise (ddpm, ddim with eta > 0)."""
        return bool((self.table[:, -1] != 0).any())

    @property
    def key(self) -> tuple:
        """Identifies the plan (for caches): the sampler, its parameters and its
        coefficients (two schedules can share everything else)."""
        return (self.sampler, self.timesteps, self.eta, self.spacing, self.variance,
                self.table.numpy().tobytes())

    def describe(self) -> str:
        extra = {"ddpm": f"variance {self.variance}", "ddim": f"eta {self.eta:g}", "dpmpp2m": ""}[self.sampler]
        return ", ".join(s for s in (f"{self.sampler}", f"{self.steps} steps", f"{self.spacing} spacing", extra) if s)


def _int_in(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")


def _lambda(alphas_cumprod):
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(a) - np.log1p(-a))            # log(alpha / sigma)


def spaced_timesteps(T, steps, spacing="uniform", alphas_cumprod=None):
    """`steps` distinct timesteps in [0, T-1], decreasing (int64 numpy).
    "logsnr" needs the schedule's alphas_cumprod (T,)."""
    _int_in("T", T, 1, 2**31)
    _int_in("steps", steps, 1, T)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}, expected one of {SPACINGS}")
    k = np.arange(steps, dtype=np.float64)
    if spacing == "uniform":
        return np.floor(k * T / steps).astype(np.int64)[::-1].copy()
    if spacing == "quadratic":
        ts = np.floor(np.linspace(0.0, math.sqrt(0.8 * T), steps) ** 2).astype(np.int64)
    else:
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise ValueError("logsnr spacing needs the schedule's alphas_cumprod of length T")
        lam = _lambda(alphas_cumprod)                  # decreasing in t
        targets = np.linspace(lam[0], lam[-1], steps)  # increasing t
        ts = np.array([int(np.argmin(np.abs(lam - v))) for v in targets], dtype=np.int64)
    for i in range(1, steps):                          # repeated values move up ...
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts = np.minimum(ts, T - steps + np.arange(steps))  # ... and stay below T
    return ts[::-1].copy()


def ddpm_table(alphas_cumprod, timesteps, variance="fixedlarge"):
    """(N, 6) float64 table of respaced ancestral sampling over `timesteps` (decreasing)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}, expected one of {VARIANCES}")
    a = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps)[::-1]]   # increasing t
    a_prev = np.append(1.0, a[:-1])
    betas = 1.0 - a / a_prev
    post_var = betas * (1.0 - a_prev) / (1.0 - a)
    if len(a) == 1:
        var = betas
    elif variance == "fixedlarge":
        var = np.append(post_var[1], betas[1:])
    else:
        var = np.append(post_var[1], post_var[1:])
    sigma = np.sqrt(var)
    sigma[0] = 0.0                                      # the last step adds no noise
    cols = [np.sqrt(1.0 / a), np.sqrt(1.0 / a - 1.0),
            (1.0 - a_prev) * np.sqrt(1.0 - betas) / (1.0 - a),     # c_x: posterior coef of x_t
            betas * np.sqrt(a_prev) / (1.0 - a),                    # c_0: posterior coef of x0
            np.zeros_like(a), sigma]
    return torch.from_numpy(np.stack(cols, 1)[::-1].copy())


def _abar_pairs(alphas_cumprod, timesteps):
    a = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps)]
    return a, np.append(a[1:], 1.0)


def ddim_table(alphas_cumprod, timesteps, eta=0.0):
    """(N, 6) float64 table of DDIM over `timesteps` (decreasing), eta in [0, 1]."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    a, a_next = _abar_pairs(alphas_cumprod, timesteps)
    sigma = eta * np.sqrt((1.0 - a_next) / (1.0 - a)) * np.sqrt(1.0 - a / a_next)
    d = np.sqrt(np.maximum(1.0 - a_next - sigma ** 2, 0.0))
    cols = [np.sqrt(1.0 / a), np.sqrt(1.0 / a - 1.0), d / np.sqrt(1.0 - a),
            np.sqrt(a_next) - d * np.sqrt(a) / np.sqrt(1.0 - a), np.zeros_like(a), sigma]
    return torch.from_numpy(np.stack(cols, 1))


def dpmpp2m_table(alphas_cumprod, timesteps):
    """(N, 6) float64 table of DPM-Solver++(2M) over `timesteps` (decreasing)."""
    a, a_next = _abar_pairs(alphas_cumprod, timesteps)
    N = len(a)
    lam = _lambda(a)
    rows = []
    for i in range(N):
        if i == N - 1:                                  # to abar = 1: x_next = x0_hat
            rows.append((0.0, 1.0, 0.0))
            continue
        h = lam[i + 1] - lam[i]
        phi = -math.expm1(-h)
        alpha_next = math.sqrt(a_next[i])
        c_x = math.sqrt(1.0 - a_next[i]) / math.sqrt(1.0 - a[i])
        if i == 0:
            rows.append((c_x, alpha_next * phi, 0.0))
        else:
            r = (lam[i] - lam[i - 1]) / h
            rows.append((c_x, alpha_next * phi * (1.0 + 0.5 / r), -alpha_next * phi * 0.5 / r))
    rows = np.asarray(rows, dtype=np.float64)
    cols = [np.sqrt(1.0 / a), np.sqrt(1.0 / a - 1.0), rows[:, 0], rows[:, 1], rows[:, 2], np.zeros_like(a)]
    return torch.from_numpy(np.stack(cols, 1))


def make_plan(diffusion, sampler="ddpm", steps=None, eta=None, spacing=None, variance=None):
    """The plan of `sampler` (SAMPLERS) for a GaussianDiffusion.

    steps: network evaluations, 1..T (default T); eta: DDIM only (default 0);
    spacing: SPACINGS (default DEFAULT_SPACING[sampler]); variance: ddpm only
    (default the diffusion's own).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}, expected one of {SAMPLERS}")
    T = diffusion.num_timesteps
    steps = T if steps is None else steps
    _int_in("steps", steps, 1, T)
    if eta is not None and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, not {sampler}")
    if variance is not None and sampler != "ddpm":
        raise ValueError(f"variance applies to the ddpm sampler only, not {sampler}")
    eta = 0.0 if eta is None else eta
    spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
    variance = diffusion.variance if variance is None else variance
    abar = diffusion.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
    ts = spaced_timesteps(T, steps, spacing, abar)
    if sampler == "ddpm":
        table = ddpm_table(abar, ts, variance)
    elif sampler == "ddim":
        table = ddim_table(abar, ts, eta)
    else:
        table = dpmpp2m_table(abar, ts)
    assert table.shape == (steps, len(SAMPLER_COEFS))
    return SamplerPlan(sampler, tuple(int(t) for t in ts), table, sampler == "dpmpp2m", float(eta), spacing,
                       variance if sampler == "ddpm" else "")
