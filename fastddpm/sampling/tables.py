"""Samplers as float64 coefficient tables: one row per network evaluation.

A plan for N steps holds N distinct decreasing timesteps tau_0 > ... > tau_{N-1}
(the network is evaluated at each; a restart, below, repeats a stretch of them)
and an (N, 11) table whose row i takes x at tau_i to x at tau_{i+1} (row N-1: to abar = 1, a clean sample, no noise), in
the one linear multistep form every sampler shares (reference.SAMPLER_COEFS):
    x0_hat = a_x x - a_e eps                      (clipped to [-1, 1] if clip)
    x_next = c_x x + c_0 x0_hat + sum_{j=1..K} c_j H_{i-j} + sigma z
    H_i    = h_x x + h_0 x0_hat                   (the history the next K rows read)
With abar_i = alphas_cumprod[tau_i], abar_N = 1, alpha = sqrt(abar),
s = sqrt(1 - abar), lambda = log(alpha / s) and h_i = lambda_{i+1} - lambda_i.
"eps" in the first line is the network's output, whatever it predicts: only
(a_x, a_e) depend on the parameterisation (the diffusion's `prediction`, the
same for every sampler), so an x0 or v network needs no conversion pass:
eps: a_x = sqrt(1/abar_i), a_e = sqrt(1/abar_i - 1); x0: a_x = 0, a_e = -1;
v: a_x = alpha_i, a_e = s_i (x0 = alpha x - s v). Every sampler below reads
the network only through x0_hat (ddim and ipndm recompute eps from the clipped
x0_hat and x), and:

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
* dpmpp2m / dpmpp3m (Lu et al. 2022, DPM-Solver++(2M) and its third-order
  multistep, data prediction, H = x0_hat): c_x = s_{i+1} / s_i; with
  phi = 1 - e^{-h_i}, r0 = h_{i-1} / h_i, r1 = h_{i-2} / h_i and the divided
  differences D1_0 = (D_i - D_{i-1}) / r0, D1_1 = (D_{i-1} - D_{i-2}) / r1:
  order 1: alpha_{i+1} phi D_i; order 2: alpha_{i+1} phi (D_i + D1_0 / 2);
  order 3: alpha_{i+1} [phi D_i + (1 - phi / h) D1 - ((h - phi) / h^2 - 1/2) D2]
  with D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
  Lower-order warm start (order min(k, i + 1)); the last row (to lambda = inf)
  is first order, x_next = x0_hat; dpmpp3m also caps the order at N - i when
  N < 15 (the reference code's lower_order_final, for stability at few steps).
* unipc (Zhao et al. 2023, UniPC-p with data prediction, B(h) = h "bh1" or
  e^h - 1 "bh2"): the predictor UniP-p from x_i^c (order p_i = min(p, i + 1,
  N - i)) and, from row 1 on, the corrector UniC-p_{i-1} that turns the
  predicted x_i into x_i^c with the network's output at x_i itself (so NFE =
  steps). Both are s_t / s_s0 x_s0 - alpha_t (e^{-h} - 1) D_s0 - alpha_t B(h)
  sum_k rho_k (D_k - D_s0) / r_k, the rho solving the order conditions
  R rho = b (R_mk = r_k^{m-1}, b_m = m! z phi_{m+1}(z) / B with z = -h,
  phi_{k+1}(z) = (e^z - sum_{l<=k} z^l / l!) / z^{k+1}, B = z (bh1) or e^z - 1
  (bh2); the predictor of order 2 takes rho = 1/2, the corrector of order 1
  rho = 1/2), r_k = (lambda_k - lambda_s0) / h. Corrector and
  predictor share their x_{i-1}^c term, so x_i^c = x_i + (a combination of
  D_{i-p} .. D_i): the row folds the correction into its D coefficients and no
  state but the history (H = x0_hat, K = p) is kept.
* ipndm (Zhang & Chen 2023, the DEIS paper's improved PNDM, in the EDM form of
  diff-sampler): with t = s / alpha and x~ = x / alpha, the Adams-Bashforth
  update x~_{i+1} = x~_i + (t_{i+1} - t_i) sum_j w_j eps_{i-j} on eps
  recomputed from the clipped x0_hat (H = eps = (x - alpha x0_hat) / s,
  K = order - 1), w = (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24 at
  order min(p, i + 1) (lower-order warm start).

Two additions to ddpm, off by default (the paper's sampler has neither):
* restart (Xu et al. 2023, "Restart Sampling for Improving Generative
  Processes"): restart = (lo, hi, K), two timesteps of the grid, lo < hi. Once
  the chain reaches x_lo it is K times re-noised to level hi by the forward
  process, x_hi = sqrt(r) x_lo + sqrt(1 - r) z' with r = abar_hi / abar_lo, and
  denoised back to x_lo by the grid's own rows; then it goes on to the end. The
  re-noising folds into the row that lands on x_lo (its output mean + sigma z is
  Gaussian, and so is the jump): c_x, c_0 times sqrt(r), sigma^2 -> r sigma^2 + 1 - r,
  so a restart costs only the network evaluations of the repeated rows: K times
  the grid's steps between hi and lo (timesteps then repeat; NFE = steps + K (i_lo - i_hi)).
  The extra Langevin-like mixing at low noise pulls samples onto the data's
  fine detail (the tiny preset's FID 116.8 -> 88.4 with (0, 9, 16); README).
* threshold (Saharia et al. 2022, Imagen's dynamic thresholding): p in (0, 1]:
  per sample s = max(1, the p-quantile of |x0_hat|) and x0_hat ->
  clamp(x0_hat, -s, s) / s instead of clamp(x0_hat, -1, 1), which keeps the
  shape of an x0_hat that overshoots at high noise instead of saturating it
  (fastddpm.sampling.step.dynamic_threshold; any sampler, with clipping on).

Timestep spacing (N network evaluations at exactly N distinct timesteps):
"uniform" tau = floor(k T / N), k = 0..N-1 (DDIM's range(0, T, T // N) when N
divides T); "trailing" round(T - k T / N) - 1, k = 0..N-1 (time-uniform with the
first step at T - 1, as diffusers' "trailing"); "quadratic" floor((k / (N - 1))^2
* 0.8 T), the DDIM paper's CIFAR-10 choice; "logsnr" the timesteps nearest to N
values of lambda uniform from lambda(T-1) to lambda(0), DPM-Solver's choice for
low-resolution images; "edm" the timesteps nearest (in log sigma) to Karras et
al.'s (EDM) grid sigma_k = (sigma_max^(1/7) + k / (N - 1) (sigma_min^(1/7) -
sigma_max^(1/7)))^7 in sigma = sqrt(1/abar - 1) from sigma(T-1) to sigma(0).
Quadratic, logsnr and edm timesteps are made strictly increasing (a repeated
value moves up by one, values stay below T), so that N steps are N distinct
timesteps. An explicit list (make_plan(timesteps=...)) must be strictly
decreasing integers in [0, T-1]. Default per sampler (DEFAULT_SPACING): the grid
the accuracy benchmark (benchmarks/test_sampler_accuracy.py: an exact-score 16-mode
Gaussian mixture, measured 2026-12-07) finds best at 10 steps, by distance to the
law and to the probability-flow ODE solution alike: ddpm uniform (the paper's),
ddim, dpmpp2m, dpmpp3m and unipc quadratic, ipndm (order 4) logsnr. On the wide
single Gaussian of tests/test_sampling.py quadratic also wins for dpmpp3m and unipc
but not for dpmpp2m (std error 9% against logsnr's 3.5% at 10 steps); the
benchmark's many narrow modes are the closer model of images, so it decides.
unipc's bh2 beat bh1 at 5 steps on a narrow Gaussian (12% against 53%).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from fastddpm.reference import MAX_HISTORY, PREDICTIONS, SAMPLER_COEFS

SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "dpmpp3m", "unipc", "ipndm")
SPACINGS = ("uniform", "trailing", "quadratic", "logsnr", "edm")
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "quadratic", "dpmpp2m": "quadratic", "dpmpp3m": "quadratic",
                   "unipc": "quadratic", "ipndm": "logsnr"}
VARIANCES = ("fixedlarge", "fixedsmall")
# --order: (lowest, highest, default) per sampler that has one
ORDERS = {"unipc": (1, 3, 3), "ipndm": (1, 4, 4)}
UNIPC_VARIANTS = ("bh1", "bh2")
DEFAULT_UNIPC_VARIANT = "bh2"   # see the module docstring
EDM_RHO = 7.0


@dataclass(frozen=True)
class SamplerPlan:
    """What a sampler runs: `timesteps` (N,) the network's t per step (decreasing; a
    restart repeats a stretch),
    `table` (N, 11) float64 coefficients (SAMPLER_COEFS), `history` K, how many
    past predictions a step reads (0: none, no ring)."""
    sampler: str
    timesteps: tuple
    table: torch.Tensor
    history: int
    eta: float
    spacing: str
    variance: str
    order: int = 1
    variant: str = ""
    prediction: str = "eps"
    restart: tuple = ()       # (lo, hi, K) or () (ddpm only; see the module docstring)
    threshold: float = 0.0    # dynamic-thresholding quantile p, or 0: clip to [-1, 1]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def multistep(self) -> bool:
        """Whether a step reads past predictions (the history ring)."""
        return self.history > 0

    @property
    def stochastic(self) -> bool:
        """Whether any step adds noise (ddpm, ddim with eta > 0)."""
        return bool((self.table[:, -1] != 0).any())

    @property
    def key(self) -> tuple:
        """Identifies the plan (for caches): the sampler, its parameters and its
        coefficients (two schedules can share everything else)."""
        return (self.sampler, self.timesteps, self.history, self.eta, self.spacing, self.variance, self.order,
                self.variant, self.prediction, self.restart, self.threshold, self.table.numpy().tobytes())

    def describe(self) -> str:
        extra = {"ddpm": f"variance {self.variance}", "ddim": f"eta {self.eta:g}",
                 "unipc": f"order {self.order}, {self.variant}", "ipndm": f"order {self.order}"}.get(self.sampler, "")
        pred = f"{self.prediction} prediction" if self.prediction != "eps" else ""
        restart = "restart {}..{} x{}".format(*self.restart) if self.restart else ""
        thr = f"dynamic threshold {self.threshold:g}" if self.threshold else ""
        return ", ".join(s for s in (f"{self.sampler}", f"{self.steps} steps", f"{self.spacing} spacing", extra, pred,
                                     restart, thr) if s)


def _int_in(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")


def _lambda(alphas_cumprod):
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(a) - np.log1p(-a))            # log(alpha / sigma)


def spaced_timesteps(T, steps, spacing="uniform", alphas_cumprod=None):
    """`steps` distinct timesteps in [0, T-1], decreasing (int64 numpy).
    "logsnr" and "edm" need the schedule's alphas_cumprod (T,)."""
    _int_in("T", T, 1, 2**31)
    _int_in("steps", steps, 1, T)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}, expected one of {SPACINGS}")
    k = np.arange(steps, dtype=np.float64)
    if spacing == "uniform":
        return np.floor(k * T / steps).astype(np.int64)[::-1].copy()
    if spacing == "trailing":
        return (np.round(T - k * T / steps) - 1).astype(np.int64)
    if spacing == "quadratic":
        ts = np.floor(np.linspace(0.0, math.sqrt(0.8 * T), steps) ** 2).astype(np.int64)
    else:
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise ValueError(f"{spacing} spacing needs the schedule's alphas_cumprod of length T")
        if spacing == "logsnr":
            key = _lambda(alphas_cumprod)                  # decreasing in t
            targets = np.linspace(key[0], key[-1], steps)  # increasing t
        else:
            key = -_lambda(alphas_cumprod)                 # log sigma_EDM = -lambda, increasing in t
            lo, hi = np.exp(key[0] / EDM_RHO), np.exp(key[-1] / EDM_RHO)
            targets = EDM_RHO * np.log(lo + (k / max(steps - 1, 1)) * (hi - lo))   # increasing t
        ts = np.array([int(np.argmin(np.abs(key - v))) for v in targets], dtype=np.int64)
    for i in range(1, steps):                          # repeated values move up ...
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts = np.minimum(ts, T - steps + np.arange(steps))  # ... and stay below T
    return ts[::-1].copy()


def check_timesteps(timesteps, T):
    """An explicit grid as a decreasing int64 numpy array; ValueError naming the problem
    unless it is a non-empty, strictly decreasing list of integers in [0, T-1]."""
    ts = list(timesteps)
    if not ts:
        raise ValueError("timesteps must not be empty")
    for v in ts:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"timesteps must be integers, got {v!r}")
        if not 0 <= v <= T - 1:
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {int(v)}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {', '.join(str(int(v)) for v in ts)}")
    return np.asarray(ts, dtype=np.int64)


def x0_columns(a, prediction="eps"):
    """(a_x, a_e) (N,) each, float64, with x0_hat = a_x x - a_e out for a network
    output `out` under `prediction` at abar = a (N,)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}, expected one of {PREDICTIONS}")
    a = np.asarray(a, dtype=np.float64)
    if prediction == "eps":
        return np.sqrt(1.0 / a), np.sqrt(1.0 / a - 1.0)
    if prediction == "x0":
        return np.zeros_like(a), -np.ones_like(a)
    return np.sqrt(a), np.sqrt(1.0 - a)


def _table(a, c_x, w, sigma=None, h=(0.0, 1.0), prediction="eps"):
    """(N, 11) float64 table from per-row c_x (N,), D weights w (N, 1 + MAX_HISTORY):
    w[i, j] multiplies D_{i-j} (c_0 = w[:, 0], c_j = w[:, j]), the history's
    (h_x, h_0) per row (N, 2) or one pair, sigma (N,) or None (no noise), and
    the network's parameterisation (x0_columns)."""
    N = len(a)
    hist = np.broadcast_to(np.asarray(h, dtype=np.float64), (N, 2))
    sigma = np.zeros(N) if sigma is None else sigma
    t = np.column_stack([*x0_columns(a, prediction), c_x, w, hist, sigma])
    assert t.shape == (N, len(SAMPLER_COEFS))
    return torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64))


def ddpm_table(alphas_cumprod, timesteps, variance="fixedlarge", prediction="eps"):
    """(N, 11) float64 table of respaced ancestral sampling over `timesteps` (decreasing)."""
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
    c_x = (1.0 - a_prev) * np.sqrt(1.0 - betas) / (1.0 - a)       # posterior coef of x_t
    w = np.zeros((len(a), 1 + MAX_HISTORY))
    w[:, 0] = betas * np.sqrt(a_prev) / (1.0 - a)                  # posterior coef of x0
    rev = slice(None, None, -1)                                    # back to decreasing t
    return _table(a[rev], c_x[rev], w[rev], sigma[rev], h=(0.0, 0.0), prediction=prediction)


MAX_RESTARTS = 1000
MAX_RESTART_STEPS = 100_000   # network evaluations a restart may add (bounds the table)


def parse_restart(text):
    """A command line's 'LO,HI,K' -> (LO, HI, K), 'none' -> None; ValueError (to be
    prefixed with the flag) for anything else. The grid check is make_plan's."""
    if text.strip().lower() in ("", "none"):
        return None
    try:
        lo, hi, k = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"must be LO,HI,K (three integers, e.g. 0,9,16) or none, got {text!r}") from None
    if not 0 <= lo < hi or k < 1:
        raise ValueError(f"needs 0 <= LO < HI and K >= 1, got {text!r}")
    return lo, hi, k


def restart_rows(alphas_cumprod, timesteps, table, restart):
    """(timesteps, table) of a ddpm grid with restart = (lo, hi, K) folded in (see the
    module docstring): the rows from hi down to the one landing on lo repeated K more
    times, each landing row followed by a re-noising to hi scaled into it."""
    lo, hi, K = restart
    ts = list(timesteps)
    if not (lo in ts and hi in ts and lo < hi):
        raise ValueError(f"restart's lo and hi must be timesteps of the grid with lo < hi, got lo={lo}, hi={hi}")
    _int_in("restart count K", K, 1, MAX_RESTARTS)
    i_hi, i_lo = ts.index(hi), ts.index(lo)
    if K * (i_lo - i_hi) > MAX_RESTART_STEPS:
        raise ValueError(f"restart ({lo}, {hi}, {K}) adds {K * (i_lo - i_hi):,} network evaluations, more than "
                         f"{MAX_RESTART_STEPS:,}: lower K or narrow lo..hi")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    r = abar[hi] / abar[lo]
    jump = table[i_lo - 1].clone()            # the row landing on x_lo, then re-noised to hi
    cols = [SAMPLER_COEFS.index(c) for c in ("c_x", "c_0")]
    sigma = SAMPLER_COEFS.index("sigma")
    jump[cols] *= math.sqrt(r)
    jump[sigma] = math.sqrt(r * float(jump[sigma]) ** 2 + 1.0 - r)
    seg = torch.cat([table[i_hi:i_lo - 1], jump[None]])
    rows = [table[:i_lo - 1], jump[None]] + [seg] * (K - 1) + [table[i_hi:]]
    return tuple(ts[:i_lo] + ts[i_hi:i_lo] * K + ts[i_lo:]), torch.cat(rows)


def _abar_pairs(alphas_cumprod, timesteps):
    a = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps)]
    return a, np.append(a[1:], 1.0)


def ddim_table(alphas_cumprod, timesteps, eta=0.0, prediction="eps"):
    """(N, 11) float64 table of DDIM over `timesteps` (decreasing), eta in [0, 1]."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    a, a_next = _abar_pairs(alphas_cumprod, timesteps)
    sigma = eta * np.sqrt((1.0 - a_next) / (1.0 - a)) * np.sqrt(1.0 - a / a_next)
    d = np.sqrt(np.maximum(1.0 - a_next - sigma ** 2, 0.0))
    w = np.zeros((len(a), 1 + MAX_HISTORY))
    w[:, 0] = np.sqrt(a_next) - d * np.sqrt(a) / np.sqrt(1.0 - a)
    return _table(a, d / np.sqrt(1.0 - a), w, sigma, h=(0.0, 0.0), prediction=prediction)


def _dpmpp_orders(N, order):
    """Per-row order of DPM-Solver++(order M): warm start, lower order near the
    end when N < 15 (3M only: the 2M's cap is its first-order last row)."""
    orders = [min(order, i + 1) for i in range(N)]
    if order == 3 and N < 15:
        orders = [min(p, N - i) for i, p in enumerate(orders)]
    orders[-1] = 1                                     # to lambda = inf: first order only
    return orders


def dpmpp_table(alphas_cumprod, timesteps, order=2, prediction="eps"):
    """(N, 11) float64 table of DPM-Solver++(2M) (order 2) or (3M) (order 3)."""
    a, a_next = _abar_pairs(alphas_cumprod, timesteps)
    N = len(a)
    lam = _lambda(a)
    c_x = np.zeros(N)
    w = np.zeros((N, 1 + MAX_HISTORY))
    for i, p in enumerate(_dpmpp_orders(N, order)):
        if i == N - 1:                                  # to abar = 1: x_next = x0_hat
            w[i, 0] = 1.0
            continue
        h = lam[i + 1] - lam[i]
        phi = -math.expm1(-h)
        alpha_next = math.sqrt(a_next[i])
        c_x[i] = math.sqrt(1.0 - a_next[i]) / math.sqrt(1.0 - a[i])
        if p == 1:
            w[i, 0] = alpha_next * phi
        elif p == 2:
            r = (lam[i] - lam[i - 1]) / h
            w[i, :2] = alpha_next * phi * (1.0 + 0.5 / r), -alpha_next * phi * 0.5 / r
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0     # over (D_i, D_{i-1}, D_{i-2})
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            w[i, :3] = alpha_next * (phi * np.array([1.0, 0.0, 0.0]) + (1.0 - phi / h) * d1
                                     - ((h - phi) / h ** 2 - 0.5) * d2)
    return _table(a, c_x, w, prediction=prediction)


def dpmpp2m_table(alphas_cumprod, timesteps, prediction="eps"):
    """(N, 11) float64 table of DPM-Solver++(2M) over `timesteps` (decreasing)."""
    return dpmpp_table(alphas_cumprod, timesteps, 2, prediction)


def _unipc_step(lam, alpha, s0, t, past, variant, corrector, N):
    """UniP (corrector False) or UniC (True) from s0 to t as weights over D_0 .. D_{N-1}
    (its x_s0 coefficient is s_t / s_s0 either way). past: the earlier rows whose D
    it uses (nearest first); the corrector also uses D_t."""
    w = np.zeros(N)
    z = -(lam[t] - lam[s0])                            # hh of the reference code; -inf at the end
    h_phi_1 = math.expm1(z)
    w[s0] -= alpha[t] * h_phi_1
    p = len(past) + 1                                  # the order
    if not corrector and p == 1:
        return w
    B = z if variant == "bh1" else math.expm1(z)
    rks = np.array([(lam[k] - lam[s0]) / (-z) for k in past] + [1.0])
    R, b, h_phi_k, fact = [], [], h_phi_1 / z - 1.0, 1.0
    for m in range(1, p + 1):
        R.append(rks ** (m - 1))
        b.append(h_phi_k * fact / B)
        fact *= m + 1
        h_phi_k = h_phi_k / z - 1.0 / fact
    R, b = np.array(R), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if p == 1 else np.linalg.solve(R, b)
    else:
        rhos = np.array([0.5]) if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    for k, rho, r in zip(past, rhos, rks):             # rho_k (D_k - D_s0) / r_k
        w[k] -= alpha[t] * B * rho / r
        w[s0] += alpha[t] * B * rho / r
    if corrector:                                      # rho_last (D_t - D_s0)
        w[t] -= alpha[t] * B * rhos[-1]
        w[s0] += alpha[t] * B * rhos[-1]
    return w


def unipc_table(alphas_cumprod, timesteps, order=3, variant=DEFAULT_UNIPC_VARIANT, prediction="eps"):
    """(N, 11) float64 table of UniPC-order (predictor and corrector) with data prediction."""
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}, expected one of {UNIPC_VARIANTS}")
    a, _ = _abar_pairs(alphas_cumprod, timesteps)
    N = len(a)
    ab = np.append(a, 1.0)
    alpha, sig = np.sqrt(ab), np.sqrt(1.0 - ab)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)               # lam[N] = inf
    orders = [min(order, i + 1, N - i) for i in range(N)]
    c_x = np.zeros(N)
    w = np.zeros((N, 1 + MAX_HISTORY))
    for i, p in enumerate(orders):
        c_x[i] = sig[i + 1] / sig[i]
        wi = _unipc_step(lam, alpha, i, i + 1, list(range(i - 1, i - p, -1)), variant, False, N + 1)
        if i > 0:                                      # x_i^c = x_i + (UniC - UniP of row i - 1)
            q = orders[i - 1]
            past = list(range(i - 2, i - 1 - q, -1))
            corr = _unipc_step(lam, alpha, i - 1, i, past, variant, True, N + 1) \
                - _unipc_step(lam, alpha, i - 1, i, past, variant, False, N + 1)
            wi = wi + c_x[i] * corr
        assert not wi[i + 1:].any() and not wi[:max(i - MAX_HISTORY, 0)].any()
        for j in range(min(i, MAX_HISTORY) + 1):
            w[i, j] = wi[i - j]
    return _table(a, c_x, w, prediction=prediction)


IPNDM_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_table(alphas_cumprod, timesteps, order=4, prediction="eps"):
    """(N, 11) float64 table of iPNDM of `order` (1..4) in the EDM form: history eps."""
    a, a_next = _abar_pairs(alphas_cumprod, timesteps)
    N = len(a)
    alpha, sig = np.sqrt(a), np.sqrt(1.0 - a)
    alpha_next = np.sqrt(a_next)
    t = np.append(sig / alpha, 0.0)                    # EDM sigma = s / alpha, 0 at the end
    c_x, w = np.zeros(N), np.zeros((N, 1 + MAX_HISTORY))
    for i in range(N):
        wts = np.array(IPNDM_WEIGHTS[min(order, i + 1) - 1]) * alpha_next[i] * (t[i + 1] - t[i])
        # x_{i+1} = alpha_{i+1} (x_i / alpha_i + dt sum_j w_j eps_{i-j}), eps_i = (x_i - alpha_i D_i) / s_i
        c_x[i] = alpha_next[i] / alpha[i] + wts[0] / sig[i]
        w[i, 0] = -wts[0] * alpha[i] / sig[i]
        w[i, 1:len(wts)] = wts[1:]
    return _table(a, c_x, w, h=np.column_stack([1.0 / sig, -alpha / sig]), prediction=prediction)


def _history(sampler, order):
    """K, the past predictions a step of `sampler` reads."""
    return {"ddpm": 0, "ddim": 0, "dpmpp2m": 1, "dpmpp3m": 2, "unipc": order, "ipndm": order - 1}[sampler]


def make_plan(diffusion, sampler="ddpm", steps=None, eta=None, spacing=None, variance=None, *, order=None,
              variant=None, timesteps=None, restart=None, threshold=None):
    """The plan of `sampler` (SAMPLERS) for a GaussianDiffusion.

    steps: network evaluations, 1..T (default T, or len(timesteps)); eta: DDIM
    only (default 0); spacing: SPACINGS (default DEFAULT_SPACING[sampler]);
    variance: ddpm only (default the diffusion's own); order: unipc (1..3,
    default 3) and ipndm (1..4, default 4) only (dpmpp2m / dpmpp3m are orders 2
    and 3); variant: unipc only, "bh1" or "bh2" (default); timesteps: an
    explicit grid (strictly decreasing ints in [0, T-1]) instead of spacing;
    restart: ddpm only, (lo, hi, K) (module docstring; steps then counts the grid,
    plan.steps the network evaluations); threshold: dynamic thresholding's
    quantile p in (0, 1] (None or 0: plain clipping).
    A sampler of order p needs at least p steps. The table reads the network's
    output as the diffusion's `prediction` says (x0_columns).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}, expected one of {SAMPLERS}")
    T = diffusion.num_timesteps
    if timesteps is not None:
        if spacing is not None:
            raise ValueError("give spacing or timesteps, not both")
        ts = check_timesteps(timesteps, T)
        if steps is not None and steps != len(ts):
            raise ValueError(f"steps ({steps}) must equal the number of timesteps ({len(ts)})")
        steps = len(ts)
    steps = T if steps is None else steps
    _int_in("steps", steps, 1, T)
    if eta is not None and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, not {sampler}")
    if variance is not None and sampler != "ddpm":
        raise ValueError(f"variance applies to the ddpm sampler only, not {sampler}")
    if order is not None and sampler not in ORDERS:
        raise ValueError(f"order applies to the {' and '.join(ORDERS)} samplers only, not {sampler}")
    if variant is not None and sampler != "unipc":
        raise ValueError(f"variant applies to the unipc sampler only, not {sampler}")
    if restart is not None and sampler != "ddpm":
        raise ValueError(f"restart applies to the ddpm sampler only, not {sampler}")
    if restart is not None and (not isinstance(restart, (tuple, list)) or len(restart) != 3
                                or any(isinstance(v, bool) or not isinstance(v, int) for v in restart)):
        raise ValueError(f"restart must be three ints (lo, hi, K), got {restart!r}")
    threshold = 0.0 if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not (threshold == 0 or 0 < threshold <= 1):
        raise ValueError(f"threshold must be a quantile in (0, 1] (or 0: off), got {threshold!r}")
    if sampler in ORDERS:
        lo, hi, default = ORDERS[sampler]
        order = default if order is None else order
        if isinstance(order, bool) or not isinstance(order, int) or not lo <= order <= hi:
            raise ValueError(f"order of {sampler} must be an int in [{lo}, {hi}], got {order!r}")
    else:
        order = {"dpmpp2m": 2, "dpmpp3m": 3}.get(sampler, 1)
    if sampler in ("dpmpp3m", "unipc", "ipndm") and steps < order:
        raise ValueError(f"{sampler} of order {order} needs at least {order} steps, got {steps}")
    variant = (DEFAULT_UNIPC_VARIANT if variant is None else variant) if sampler == "unipc" else ""
    if sampler == "unipc" and variant not in UNIPC_VARIANTS:
        raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
    eta = 0.0 if eta is None else eta
    abar = diffusion.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
    if timesteps is None:
        spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
        ts = spaced_timesteps(T, steps, spacing, abar)
    else:
        spacing = "explicit"
    variance = diffusion.variance if variance is None else variance
    pred = diffusion.prediction
    if sampler == "ddpm":
        table = ddpm_table(abar, ts, variance, pred)
    elif sampler == "ddim":
        table = ddim_table(abar, ts, eta, pred)
    elif sampler in ("dpmpp2m", "dpmpp3m"):
        table = dpmpp_table(abar, ts, order, pred)
    elif sampler == "unipc":
        table = unipc_table(abar, ts, order, variant, pred)
    else:
        table = ipndm_table(abar, ts, order, pred)
    assert table.shape == (steps, len(SAMPLER_COEFS))
    ts = tuple(int(t) for t in ts)
    if restart is not None:
        ts, table = restart_rows(abar, ts, table, tuple(restart))
    return SamplerPlan(sampler, ts, table, _history(sampler, order), float(eta), spacing,
                       variance if sampler == "ddpm" else "", order, variant, pred,
                       tuple(restart) if restart is not None else (), float(threshold))
