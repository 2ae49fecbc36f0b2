"""The multistep samplers dpmpp3m, unipc and ipndm, the time grids and their bad input.

* Each table row run by the fused update (reference.sample_step_ref, float64,
  with its history ring) is checked against a direct float64 implementation of
  the paper's algorithm written here (keeping its own list of past outputs and,
  for UniPC, the corrected state the table folds away), step by step.
* Where diffusers implements the method (DPMSolverMultistepScheduler with
  solver_order 3, UniPCMultistepScheduler bh1/bh2 order 2-3), its trajectory on
  the same timesteps agrees to 1e-6 relative per step. Both schedulers are run
  with their defaults that match ours (final_sigmas_type "zero": a first-order
  last step to sigma = 0; lower_order_final), on our timesteps (its grids are
  its own). Diffusers-only differences: its UniPC bh1 returns NaN in the last
  step into sigma = 0 (-inf times a zero correction); its DPM-Solver step casts
  the sample to float32 (measured agreement 3e-8 .. 1.3e-7 relative, UniPC 2e-15).
"""
import math

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, reference
from fastddpm.sampling import make_plan, sample, spaced_timesteps
from fastddpm.sampling.tables import ORDERS, SAMPLERS, SPACINGS, check_timesteps

T = 1000
D = GaussianDiffusion.linear(T=T)
ABAR = D.alphas_cumprod.double().numpy()


def _eps_model(x, t):
    """A smooth nonlinear stand-in for a network (float64, t an int)."""
    a = ABAR[t]
    return torch.tanh(0.7 * x + 0.3 * math.sqrt(1 - a)) * 0.9 + 0.2 * torch.sin(3 * x) * a


def _x_T(seed=0, shape=(3, 2, 4, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run_table(plan, x):
    """The plan through the fused update's reference in float64; the states x_1 .. x_N."""
    table = plan.table.double()
    ring = torch.zeros((plan.history + 1, *x.shape), dtype=torch.float64) if plan.history else None
    out = []
    for i, t in enumerate(plan.timesteps):
        x, _ = reference.sample_step_ref(x, _eps_model(x, t), table, torch.tensor([i]), ring, clip=False)
        out.append(x)
    return out


def _sched(ts):
    a = np.append(ABAR[list(ts)], 1.0)
    alpha, sig = np.sqrt(a), np.sqrt(1 - a)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)
    return alpha, sig, lam


def _x0(x, t):
    a = ABAR[t]
    return (x - math.sqrt(1 - a) * _eps_model(x, t)) / math.sqrt(a)


# ----------------------------------------------------------------------------- independent float64 algorithms


def _dpmpp3m_direct(ts, x):
    """DPM-Solver++(3M), Lu et al. 2022 (multistep, data prediction), its orders
    as in the reference code: warm start, lower order in the last two steps below
    15 steps, first order into sigma = 0."""
    alpha, sig, lam = _sched(ts)
    N, Ds, out = len(ts), [], []
    for i, t in enumerate(ts):
        Ds.append(_x0(x, t))
        p = min(3, i + 1)
        if N < 15:
            p = min(p, N - i)
        if i == N - 1:
            out.append(Ds[-1])
            x = Ds[-1]
            continue
        h = lam[i + 1] - lam[i]
        base = sig[i + 1] / sig[i] * x - alpha[i + 1] * math.expm1(-h) * Ds[-1]
        if p == 1:
            x = base
        elif p == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            x = base - 0.5 * alpha[i + 1] * math.expm1(-h) * (Ds[-1] - Ds[-2]) / r0
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (Ds[-1] - Ds[-2]) / r0, (Ds[-2] - Ds[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = base + alpha[i + 1] * (math.expm1(-h) / h + 1) * d1 \
                - alpha[i + 1] * ((math.expm1(-h) + h) / h ** 2 - 0.5) * d2
        out.append(x)
    return out


def _unipc_coefs(lam, s0, t, past, variant, corrector):
    """rho of UniP / UniC (Zhao et al. 2023, Algorithms 2-3 with B(h)), r_k, B, h phi_1."""
    h = lam[t] - lam[s0]
    z = -h
    rks = [(lam[k] - lam[s0]) / h for k in past] + [1.0]
    p = len(rks)
    B = z if variant == "bh1" else math.expm1(z)
    # phi_{k+1}(z) z^{k+1} = e^z - sum_{l <= k} z^l / l!; b_m = m! phi_{m+1}(z) z / B
    b = [math.factorial(m) * (math.exp(z) - sum(z ** l / math.factorial(l) for l in range(m + 1))) / z ** m / B
         for m in range(1, p + 1)]
    R = np.array([[r ** (m - 1) for r in rks] for m in range(1, p + 1)])
    if corrector:
        rho = [0.5] if p == 1 else list(np.linalg.solve(R, b))
    else:
        rho = [] if p == 1 else [0.5] if p == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
    return rho, rks, B, math.expm1(z)


def _unipc_direct(ts, x, order, variant):
    """UniPC-order with data prediction: at each step the corrector UniC (with the
    output at the new point, then kept) and the predictor UniP from the corrected x."""
    alpha, sig, lam = _sched(ts)
    N, Ds, out = len(ts), {}, []
    x_c_prev, q_prev = None, None
    for i, t in enumerate(ts):
        Ds[i] = _x0(x, t)
        if i > 0:                                       # correct x_i with D_i
            s0, past = i - 1, list(range(i - 2, i - 1 - q_prev, -1))
            rho, rks, B, hphi = _unipc_coefs(lam, s0, i, past, variant, True)
            res = sum(r * (Ds[k] - Ds[s0]) / rk for k, r, rk in zip(past, rho, rks)) + rho[-1] * (Ds[i] - Ds[s0])
            x = sig[i] / sig[s0] * x_c_prev - alpha[i] * hphi * Ds[s0] - alpha[i] * B * res
        p = min(order, i + 1, N - i)
        past = list(range(i - 1, i - p, -1))
        if p == 1 and i == N - 1:                        # into sigma = 0: x = D
            x_next = Ds[i]
        else:
            rho, rks, B, hphi = _unipc_coefs(lam, i, i + 1, past, variant, False)
            res = sum(r * (Ds[k] - Ds[i]) / rk for k, r, rk in zip(past, rho, rks))
            x_next = sig[i + 1] / sig[i] * x - alpha[i + 1] * hphi * Ds[i] - alpha[i + 1] * B * res
        x_c_prev, q_prev, x = x, p, x_next
        out.append(x)
    return out


def _ipndm_direct(ts, x, order):
    """iPNDM (Zhang & Chen 2023) in the EDM form: x~ = x / alpha, t = s / alpha,
    Adams-Bashforth on d = eps with warm start."""
    alpha, sig, _ = _sched(ts)
    tt = sig / alpha
    w = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    eps, out = [], []
    xt = x / alpha[0]
    for i, t in enumerate(ts):
        eps.append(_eps_model(xt * alpha[i], t))
        p = min(order, i + 1)
        xt = xt + (tt[i + 1] - tt[i]) * sum(c * eps[-1 - j] for j, c in enumerate(w[p]))
        out.append(xt * alpha[i + 1])
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [("dpmpp3m", {}, 5), ("dpmpp3m", {}, 20), ("dpmpp3m", {}, 3)] + \
    [("unipc", {"order": p, "variant": v}, n) for p in (1, 2, 3) for v in ("bh1", "bh2") for n in (5, 12)] + \
    [("ipndm", {"order": p}, n) for p in (1, 2, 3, 4) for n in (4, 10)]


@pytest.mark.parametrize("sampler,kw,steps", CASES, ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}-{c[2]}"
                                                         for c in CASES])
@pytest.mark.parametrize("spacing", ["logsnr", "edm"])
def test_table_equals_the_papers_algorithm(sampler, kw, steps, spacing):
    plan = make_plan(D, sampler, steps, spacing=spacing, **kw)
    x = _x_T(steps)
    if sampler == "dpmpp3m":
        want = _dpmpp3m_direct(plan.timesteps, x)
    elif sampler == "unipc":
        want = _unipc_direct(plan.timesteps, x, kw["order"], kw["variant"])
    else:
        want = _ipndm_direct(plan.timesteps, x, kw["order"])
    got = _run_table(plan, x)
    for i, (g, w) in enumerate(zip(got, want)):
        assert _rel(g, w) < 1e-10, f"{sampler} {kw} step {i}: rel err {_rel(g, w):.2e}"
    assert not plan.stochastic and plan.history == {"dpmpp3m": 2, "unipc": kw.get("order"),
                                                    "ipndm": kw.get("order", 1) - 1}[sampler]


# ----------------------------------------------------------------------------- against diffusers


def _diffusers_run(scheduler, ts, x):
    """scheduler.step over our timesteps (its sigmas in float64), model outputs eps."""
    scheduler.set_timesteps(len(ts))
    a = ABAR[list(ts)]
    scheduler.timesteps = torch.tensor(list(ts), dtype=torch.int64)
    scheduler.sigmas = torch.tensor(np.append(np.sqrt((1 - a) / a), 0.0), dtype=torch.float64)
    out = []
    for t in ts:
        x = scheduler.step(_eps_model(x, t), int(t), x).prev_sample
        out.append(x)
    return out


DIFFUSERS_CASES = [("dpmpp3m", {}, n) for n in (6, 10, 16)] + \
    [("unipc", {"order": p, "variant": v}, n) for p in (2, 3) for v in ("bh1", "bh2") for n in (6, 16)]


@pytest.mark.parametrize("sampler,kw,steps", DIFFUSERS_CASES,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}-{c[2]}" for c in DIFFUSERS_CASES])
def test_trajectory_equals_diffusers(sampler, kw, steps):
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", thresholding=False, lower_order_final=True,
                  final_sigmas_type="zero")
    if sampler == "dpmpp3m":
        sch = diffusers.DPMSolverMultistepScheduler(solver_order=3, algorithm_type="dpmsolver++",
                                                    solver_type="midpoint", euler_at_final=False, **common)
    else:
        sch = diffusers.UniPCMultistepScheduler(solver_order=kw["order"], solver_type=kw["variant"],
                                                predict_x0=True, **common)
    plan = make_plan(D, sampler, steps, **kw)
    x = _x_T(100 + steps)
    ours, theirs = _run_table(plan, x), _diffusers_run(sch, plan.timesteps, x)
    if kw.get("variant") == "bh1":
        # diffusers-only: its bh1 last step into sigma = 0 multiplies B(h) = -h = -inf by a
        # zero correction and returns NaN; ours is the first-order step, x = x0_hat
        assert torch.isnan(theirs[-1]).all() and torch.isfinite(ours[-1]).all()
        ours, theirs = ours[:-1], theirs[:-1]
    for i, (g, w) in enumerate(zip(ours, theirs)):
        assert _rel(g, w) < 1e-6, f"{sampler} {kw} step {i}: rel err {_rel(g, w):.2e} vs diffusers"


# ----------------------------------------------------------------------------- grids and bad input


def test_grids():
    # trailing: diffusers' round(arange(T, 0, -T/N)) - 1, first step T - 1
    for n in (5, 7, 10, 999):
        want = (np.round(np.arange(T, 0, -T / n)) - 1).astype(int)
        assert spaced_timesteps(T, n, "trailing").tolist() == want.tolist()
    assert spaced_timesteps(T, 10, "trailing")[0] == T - 1
    # edm: Karras' rho = 7 grid in sigma = sqrt(1/abar - 1), nearest integer timesteps
    sig = np.sqrt(1 / ABAR - 1)
    ts = spaced_timesteps(T, 6, "edm", ABAR)
    ramp = np.linspace(0, 1, 6)
    want = (sig[-1] ** (1 / 7) + ramp * (sig[0] ** (1 / 7) - sig[-1] ** (1 / 7))) ** 7
    assert ts[0] == T - 1 and ts[-1] == 0
    assert np.all(np.abs(np.log(sig[ts]) - np.log(want)) < np.abs(np.diff(np.log(sig))).max() * 2)
    for spacing in SPACINGS:
        for n in (1, 2, 17, 200, T):
            g = spaced_timesteps(T, n, spacing, ABAR)
            assert len(set(g.tolist())) == n and np.all(np.diff(g) < 0) and 0 <= g[-1] and g[0] <= T - 1


def test_explicit_timesteps():
    plan = make_plan(D, "unipc", timesteps=[999, 700, 400, 100, 0])
    assert plan.timesteps == (999, 700, 400, 100, 0) and plan.spacing == "explicit" and plan.steps == 5
    from fastddpm.sampling.tables import ddim_table
    torch.testing.assert_close(make_plan(D, "ddim", timesteps=np.array([999, 500, 0])).table,
                               ddim_table(ABAR, [999, 500, 0]), rtol=0, atol=0)
    assert make_plan(D, "ddim", 4, spacing="trailing").timesteps == make_plan(
        D, "ddim", timesteps=spaced_timesteps(T, 4, "trailing").tolist()).timesteps


@pytest.mark.parametrize("kw,match", [
    (dict(sampler="unipc", order=4), r"order of unipc must be an int in \[1, 3\]"),
    (dict(sampler="ipndm", order=0), r"order of ipndm must be an int in \[1, 4\]"),
    (dict(sampler="ipndm", order=2.0), "order of ipndm"),
    (dict(sampler="dpmpp3m", order=3), "order applies to the unipc and ipndm samplers only"),
    (dict(sampler="ipndm", variant="bh2"), "variant applies to the unipc sampler only"),
    (dict(sampler="unipc", variant="bh3"), "variant must be one of"),
    (dict(sampler="unipc", steps=2), "unipc of order 3 needs at least 3 steps"),
    (dict(sampler="ipndm", order=4, steps=3), "needs at least 4 steps"),
    (dict(sampler="dpmpp3m", steps=2), "needs at least 3 steps"),
    (dict(sampler="ddim", timesteps=[5, 7]), "strictly decreasing"),
    (dict(sampler="ddim", timesteps=[5, 5]), "strictly decreasing"),
    (dict(sampler="ddim", timesteps=[1000, 5]), r"in \[0, 999\]"),
    (dict(sampler="ddim", timesteps=[5, -1]), r"in \[0, 999\]"),
    (dict(sampler="ddim", timesteps=[5.0, 1]), "integers"),
    (dict(sampler="ddim", timesteps=[]), "empty"),
    (dict(sampler="ddim", timesteps=[9, 1], steps=3), "must equal the number of timesteps"),
    (dict(sampler="ddim", timesteps=[9, 1], spacing="edm"), "spacing or timesteps"),
    (dict(sampler="ddim", spacing="karras"), "unknown spacing"),
])
def test_bad_plans_name_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        make_plan(D, **kw)


def test_every_sampler_and_spacing_makes_a_plan():
    """The names the accuracy benchmark enumerates: every combination builds, at few steps."""
    for sampler in SAMPLERS:
        for spacing in SPACINGS:
            plan = make_plan(D, sampler, 5, spacing=spacing)
            assert plan.table.shape == (5, 11) and torch.isfinite(plan.table).all()
    assert set(ORDERS) == {"unipc", "ipndm"}
    assert check_timesteps(np.array([3, 1]), 10).tolist() == [3, 1]


class _GaussianEps(torch.nn.Module):
    """Optimal eps for data N(mu, s^2 I) (as in test_sampling)."""

    def __init__(self, mu, s):
        super().__init__()
        self.register_buffer("abar", D.alphas_cumprod.float())
        self.register_buffer("mu", mu)
        self.s = s
        self.config = type("C", (), dict(in_channels=mu.shape[0], image_size=mu.shape[1]))
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)


# std errors measured (seed 1, 2026-12-07) at 20 steps: dpmpp3m +1.8%, unipc +1.1%, ipndm +2.2%
# (at 10 steps the multistep methods still overshoot this narrow law by 6-15%: tables.py)
@pytest.mark.parametrize("sampler,steps", [("dpmpp3m", 20), ("unipc", 20), ("ipndm", 20)])
def test_exact_gaussian_model_is_reproduced(sampler, steps):
    """Through sample() (the fused op on the default backend, the history ring on
    the device): the mean and std of a Gaussian law come back."""
    mu, s = torch.tensor([0.5, -0.3, 0.1, 0.8]).view(1, 2, 2), 0.5
    x = sample(_GaussianEps(mu, s), D, 2048, batch_size=2048, seed=1, progress=False, clip=False,
               sampler=sampler, steps=steps).double()
    mean = x.mean(0)
    assert (mean - mu).abs().max() < 0.04
    assert abs(((x - mean) ** 2).mean().sqrt().item() / s - 1) < 0.05


@pytest.mark.parametrize("sampler,kw", [("dpmpp3m", {}), ("unipc", {"order": 3}), ("ipndm", {"order": 4})])
def test_every_backend_runs_the_same_trajectory(sampler, kw):
    """The whole sampler (history ring on the device, K = 2..3) on the Triton kernel
    (interpreter) and the C++ op equals the reference op to float32 rounding."""
    from fastddpm import ops
    mu = torch.tensor([0.5, -0.3, 0.1, 0.8]).view(1, 2, 2)
    model = _GaussianEps(mu, 0.5)
    out = {}
    for backend in ("reference", "triton", "cpp"):
        if ops.available_backends()[backend] is not None:
            continue
        with ops.use_backend(backend):
            out[backend] = sample(model, D, 4, seed=2, progress=False, clip=True, sampler=sampler, steps=6, **kw)
    assert len(out) >= 2, out.keys()
    for backend, x in out.items():
        assert _rel(x.double(), out["reference"].double()) < 1e-5, backend
