"""Sampler accuracy at a given number of network evaluations (NFE): fastddpm's
samplers against diffusers' schedulers on a data law with an exact eps.

The law (benchmarks/gaussian_mixture.py): 16 equally likely Gaussians of std
0.1 in 3x8x8 image shape under the paper's linear schedule (T = 1000); the
"network" is its optimal eps in closed form, computed in float64. Every sampler
runs through that same model function from the same x_T (fastddpm's Philox
stream, seed SEED; diffusers scale it by init_noise_sigma), in float32 as a real
model's samples are, without clipping or thresholding (the exact x0_hat needs
none: the means lie in [-0.6, 0.6]). NFE = the model calls actually made, so
two-evaluation steps (Heun, KDPM2) and PRK warm-ups count right.

Swept: every fastddpm sampler in fastddpm.sampling.tables.SAMPLERS with every
keyword make_plan takes that is listed in FASTDDPM_SWEEP (spacing, eta,
variance, order where it exists; invalid combinations raise ValueError and are
skipped), and every diffusers scheduler in METHODS with each timestep spacing
and sigma option it offers (configs it refuses are skipped; configs giving the
same grid as one already run are run once). Per method the config
with the lowest distance is kept, per NFE.

Metrics, against N samples:
* SW: the sliced 1-Wasserstein distance to the law (P random directions),
  each sample weighted so that every mode it falls in (nearest mean) counts
  equally, so that how many samples land in each mode (multinomial noise, and a
  sampler's own bias) does not swamp the shape of the modes. Printed as a ratio
  to the noise floor: the same distance of exact samples of the law (mean of
  FLOOR_DRAWS draws of N).
* TV: the mode proportions' total-variation distance from uniform (floor: the
  same for exact samples).
* ODE: for deterministic samplers, the RMS distance per element to an accurate
  solution of the probability-flow ODE from the same x_T (RK4 in a rho = 7 warp
  of the EDM noise level, ODE_STEPS steps in float64; its error is estimated by
  the same solve with twice the steps on ODE_CHECK samples and asserted small),
  and the fraction of samples that end in another mode than the ODE's.

The 1000-step ancestral sampler must land at the floor: that validates the
harness (law, model function, metric). Run (a few minutes on 2 cores):
    pytest benchmarks/test_sampler_accuracy.py --benchmark-only -s
The tables go to stdout at the end and to RESULTS (benchmarks/results/
sampler-accuracy-<date>.txt; $FASTDDPM_ACCURACY_OUT overrides).
"""
import datetime
import inspect
import itertools
import math
import os
import platform
import time
import warnings

import pytest
import torch

from fastddpm import GaussianDiffusion
from fastddpm.sampling import sample_batch, tables
from gaussian_mixture import (GaussianMixture, directions, probability_flow, quantile_levels, sliced_w1,
                              weighted_quantiles)

NFES = (3, 4, 5, 6, 8, 10, 20)
N = 4096                 # samples per sampler
SEED = 0                 # the Philox stream of x_T (and fastddpm's noise)
DIRECTIONS = 64          # SW projections
LEVELS = 1024            # quantile levels per projection
REFERENCE_PER_MODE = 1024
FLOOR_DRAWS = 8
ODE_STEPS = 200
ODE_CHECK = 512
AT_FLOOR = 1.25          # the 1000-step ancestral sampler's SW / floor must be below this
SUMMARY_LINES = []       # printed by benchmarks/conftest.py at the end
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# make_plan keywords swept where its signature has them (None: not passed, its
# default; a keyword a sampler does not take raises ValueError and is skipped).
FASTDDPM_SWEEP = {
    "spacing": (None,) + tuple(tables.SPACINGS),
    "eta": (None, 0.5, 1.0),
    "variance": (None,) + tuple(getattr(tables, "VARIANCES", ("fixedlarge", "fixedsmall"))),
    "order": (None, 1, 2, 3, 4),
    "variant": (None,) + tuple(getattr(tables, "UNIPC_VARIANTS", ())),
}

# diffusers: (label, class, method kwargs, step kwargs, stochastic). Each is run
# with every value of GRID_OPTIONS its constructor accepts.
METHODS = (
    [("DDIM", "DDIMScheduler", {}, {"eta": 0.0}, False),
     ("DDIM eta=1", "DDIMScheduler", {}, {"eta": 1.0}, True),
     ("DDPM fixed_small", "DDPMScheduler", {"variance_type": "fixed_small"}, {}, True),
     ("DDPM fixed_large", "DDPMScheduler", {"variance_type": "fixed_large"}, {}, True)]
    + [(f"DPMSolverMultistep++ o{order}" + (f" {st}" if order == 2 else ""), "DPMSolverMultistepScheduler",
        {"solver_order": order, "solver_type": st}, {}, False)
       for order, st in ((2, "midpoint"), (2, "heun"), (3, "midpoint"))]
    + [("DPMSolverMultistep sde++ o2", "DPMSolverMultistepScheduler",
        {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}, {}, True)]
    + [(f"DPMSolverSinglestep++ o{order}", "DPMSolverSinglestepScheduler", {"solver_order": order}, {}, False)
       for order in (2, 3)]
    + [(f"UniPC {st} o{order}", "UniPCMultistepScheduler", {"solver_order": order, "solver_type": st}, {}, False)
       for order in (2, 3) for st in ("bh1", "bh2")]
    + [(f"DEIS o{order}", "DEISMultistepScheduler", {"solver_order": order}, {}, False) for order in (2, 3)]
    + [(f"SA-Solver p{o}c{o} tau=0", "SASolverScheduler",
        {"predictor_order": o, "corrector_order": o, "tau_func": lambda t: 0.0}, {}, False) for o in (2, 3)]
    + [("SA-Solver p2c2", "SASolverScheduler", {"predictor_order": 2, "corrector_order": 2}, {}, True),
       ("PNDM", "PNDMScheduler", {}, {}, False),
       ("PNDM skip_prk", "PNDMScheduler", {"skip_prk_steps": True}, {}, False),
       ("Euler", "EulerDiscreteScheduler", {}, {}, False),
       ("Euler ancestral", "EulerAncestralDiscreteScheduler", {}, {}, True),
       ("Heun", "HeunDiscreteScheduler", {}, {}, False),
       ("LMS", "LMSDiscreteScheduler", {}, {}, False),
       ("KDPM2", "KDPM2DiscreteScheduler", {}, {}, False),
       ("KDPM2 ancestral", "KDPM2AncestralDiscreteScheduler", {}, {}, True)]
)
SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
GRID_OPTIONS = {"timestep_spacing": ("linspace", "leading", "trailing"), "set_alpha_to_one": (True, False)}
NOT_RUN = {"DPMSolverSDEScheduler": "needs torchsde",
           "DPM-Solver (not ++), LMS orders < 4, steps_offset=1": "kept the run time down",
           "EDM*Scheduler": "EDM preconditioning and sigma_max 80, not this schedule's model input"}


class ExactEps(torch.nn.Module):
    """The law's optimal eps as a network: model(x, t), t integer or fractional
    timesteps (a 0-d or (B,) tensor; fractional t interpolates log(sigma / alpha)
    linearly, as diffusers' sigma-to-t does). Counts calls and remembers the
    first call's input (x_T)."""

    def __init__(self, law, alphas_cumprod):
        super().__init__()
        self.law = law
        a = alphas_cumprod.to(torch.float64)
        self.log_sigma = 0.5 * (torch.log1p(-a) - torch.log(a))
        self.config = type("Config", (), {"in_channels": law.shape[0], "image_size": law.shape[1]})()
        self.calls = 0
        self.first_input = None

    def abar(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.isfinite(t).all():
            raise ValueError(f"non-finite timestep {t.reshape(-1)[:4].tolist()}")
        t = t.clamp(0, len(self.log_sigma) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp_max(len(self.log_sigma) - 1)
        w = t - lo
        ls = self.log_sigma[lo] * (1 - w) + self.log_sigma[hi] * w
        return torch.sigmoid(-2 * ls)                   # 1 / (1 + sigma^2 / alpha^2)

    def forward(self, x, t):
        if self.calls == 0:
            self.first_input = x.detach().clone()
        self.calls += 1
        return self.law.eps(x, self.abar(t).expand(x.shape[0])).to(x.dtype)


class Yardstick:
    """The metrics of a set of N samples (see the module docstring)."""

    def __init__(self, law, ode_solution):
        self.law = law
        self.dirs = directions(law.dim, DIRECTIONS, seed=1)
        self.levels = quantile_levels(LEVELS)
        g = torch.Generator().manual_seed(2)
        labels = torch.arange(law.modes).repeat_interleave(REFERENCE_PER_MODE)
        ref, _ = law.sample(len(labels), g, labels)
        self.ref_q = weighted_quantiles(ref, torch.ones(len(ref), dtype=torch.float64), self.dirs, self.levels)
        self.ode = ode_solution
        self.ode_modes = law.nearest_mode(ode_solution) if ode_solution is not None else None
        floors = [self.measure(law.sample(N, g)[0]) for _ in range(FLOOR_DRAWS)]
        self.sw_floor = sum(f["sw"] for f in floors) / FLOOR_DRAWS
        self.sw_floor_sd = math.sqrt(sum((f["sw"] - self.sw_floor) ** 2 for f in floors) / (FLOOR_DRAWS - 1))
        self.tv_floor = sum(f["tv"] for f in floors) / FLOOR_DRAWS

    def measure(self, x, deterministic=False):
        x = x.to(torch.float64)
        if not torch.isfinite(x).all():
            return {"sw": math.inf, "tv": math.inf, "ode": math.inf if deterministic else None, "switched": None}
        w, tv = self.law.mode_weights(x)
        out = {"sw": sliced_w1(weighted_quantiles(x, w, self.dirs, self.levels), self.ref_q), "tv": tv,
               "ode": None, "switched": None}
        if deterministic and self.ode is not None:
            out["ode"] = (x - self.ode).pow(2).mean().sqrt().item()
            out["switched"] = (self.law.nearest_mode(x) != self.ode_modes).double().mean().item()
        return out


def fastddpm_configs(diffusion):
    """(label, config text, plan) for every valid combination of the swept make_plan
    keywords, per sampler and NFE; identical plans once."""
    params = inspect.signature(tables.make_plan).parameters
    swept = [k for k in FASTDDPM_SWEEP if k in params]
    out, seen = [], set()
    for sampler in tables.SAMPLERS:
        for nfe in NFES:
            for values in itertools.product(*(FASTDDPM_SWEEP[k] for k in swept)):
                kw = {k: v for k, v in zip(swept, values) if v is not None}
                try:
                    plan = tables.make_plan(diffusion, sampler, steps=nfe, **kw)
                except ValueError:
                    continue
                key = getattr(plan, "key", None) or (sampler, nfe, tuple(sorted(kw.items())))
                if key in seen:
                    continue
                seen.add(key)
                order, variant = getattr(plan, "order", kw.get("order")), getattr(plan, "variant", kw.get("variant"))
                label = " ".join([sampler] + ([f"o{order}"] if sampler in getattr(tables, "ORDERS", {}) else [])
                                 + ([variant] if variant else []))
                cfg = " ".join([f"spacing={getattr(plan, 'spacing', kw.get('spacing'))}"]
                               + [f"{k}={v}" for k, v in kw.items() if k not in ("order", "variant", "spacing")])
                out.append((label, cfg, plan))
    return out


def run_fastddpm(model, diffusion, plan):
    model.calls = 0
    x = sample_batch(model, diffusion, N, SEED, plan=plan, device="cpu", precision="fp32", clip=False,
                     progress=False)
    return x, model.calls


def diffusers_configs():
    """(label, class, init kwargs, step kwargs, stochastic, config text) for every
    method in METHODS times the grid options its constructor takes."""
    import diffusers
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon")
    out = []
    for label, cls_name, kw, step_kw, stochastic in METHODS:
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            continue
        params = inspect.signature(cls.__init__).parameters
        grid = {k: v for k, v in GRID_OPTIONS.items() if k in params}
        sigmas = [None] + [s for s in SIGMA_OPTIONS if s in params]
        extra = {"clip_sample": False} if "clip_sample" in params else {}
        for values in itertools.product(*grid.values()):
            g = dict(zip(grid, values))
            for s in sigmas:
                init = {**common, **extra, **kw, **g, **({s: True} if s else {})}
                cfg = " ".join([f"{k}={v}" for k, v in g.items()] + ([s] if s else []))
                out.append((label, cls, init, step_kw, stochastic, cfg))
    return out


def _grid_signature(sched):
    parts = [tuple(sched.timesteps.tolist())]
    for name in ("sigmas", "lambda_t", "final_alpha_cumprod"):
        v = getattr(sched, name, None)
        if isinstance(v, torch.Tensor):
            parts.append(tuple(v.reshape(-1).tolist()))
    return tuple(parts)


def diffusers_steps_per_nfe(cls, init):
    """{target NFE: (num_inference_steps, calls)}: the most steps whose calls (one
    per entry of the scheduler's timesteps) fit in each target."""
    sched = cls(**init)
    calls = {}

    def count(steps):
        if steps not in calls:
            try:
                sched.set_timesteps(steps)
                calls[steps] = len(sched.timesteps)
            except (ValueError, NotImplementedError, AssertionError, IndexError):
                calls[steps] = None
        return calls[steps]

    best = {}
    for nfe in NFES:
        for steps in range(nfe, 0, -1):
            c = count(steps)
            if c is not None and c <= nfe:
                best[nfe] = (steps, c)
                break
    return best


def run_diffusers(model, cls, init, step_kw, steps, x_T, generator_seed):
    sched = cls(**init)
    sched.set_timesteps(steps)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    g = torch.Generator().manual_seed(generator_seed)
    x = x_T * sched.init_noise_sigma
    model.calls = 0
    for t in sched.timesteps:
        eps = model(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, **step_kw, **({"generator": g} if takes_generator else {})).prev_sample
    return x, model.calls


def _fmt(v, spec):
    width = spec.split(".")[0].rstrip("<>")
    text = "-" if v is None else ("inf" if v == math.inf else format(v, spec))
    return format(text, f">{width}") if width else text


def nfe_table(nfe, rows, stick):
    """Lines of one NFE's table: the best config per method, best first."""
    lines = [f"NFE {nfe}", f"  {'':10}{'method':40} {'calls':>5} {'SW/floor':>8} {'TV':>6} {'ODE rms':>8} "
             f"{'switched':>8}  best config"]
    for r in sorted(rows, key=lambda r: r["sw"]):
        lines.append(f"  {r['who']:10}{r['label']:40} {r['calls']:5d} {_fmt(r['sw'] / stick.sw_floor, '8.2f')} "
                     f"{_fmt(r['tv'], '6.3f')} {_fmt(r['ode'], '8.4f')} {_fmt(r['switched'], '8.3%')}  {r['cfg']}")
    return lines


def _best(rows, who, key):
    vals = [r[key] for r in rows if r["who"] == who and r[key] is not None]
    return min(vals) if vals else None


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    import diffusers
    before = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(before)


@pytest.fixture
def one_thread():
    """Each model call and step is small: on a shared 2-core machine two threads
    spin-wait for each other (measured 12x slower per call under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sampler_accuracy(benchmark, one_thread):
    t_start = time.perf_counter()
    diffusion = GaussianDiffusion.linear(T=1000, beta_start=1e-4, beta_end=0.02)
    abar = diffusion.alphas_cumprod.to(torch.float64)
    law = GaussianMixture(modes=16, shape=(3, 8, 8), std=0.1, spread=0.6, seed=0)
    model = ExactEps(law, abar)

    # The 1000-step ancestral sampler first: it fixes x_T (the model's first input).
    ddpm = tables.make_plan(diffusion, "ddpm", steps=diffusion.num_timesteps)
    x_ddpm, calls = run_fastddpm(model, diffusion, ddpm)
    assert calls == ddpm.steps
    x_T = model.first_input.clone()

    sigma_max = math.sqrt((1 - abar[-1].item()) / abar[-1].item())
    ode = probability_flow(law, x_T, sigma_max, ODE_STEPS)
    ode_err = (probability_flow(law, x_T[:ODE_CHECK], sigma_max, 2 * ODE_STEPS) - ode[:ODE_CHECK]) \
        .pow(2).mean().sqrt().item()
    stick = Yardstick(law, ode)
    t_setup = time.perf_counter() - t_start

    rows = {nfe: [] for nfe in NFES}
    anc = stick.measure(x_ddpm)
    # fastddpm
    for label, cfg, plan in fastddpm_configs(diffusion):
        x, calls = run_fastddpm(model, diffusion, plan)
        assert torch.equal(model.first_input, x_T), "fastddpm started from another x_T"
        m = stick.measure(x, deterministic=not plan.stochastic)
        rows[plan.steps].append(dict(who="fastddpm", label=label, cfg=cfg, calls=calls, **m))
    t_ours = time.perf_counter() - t_start - t_setup
    # diffusers
    runs, refused, seen, failed = 0, 0, set(), []
    warnings.simplefilter("ignore")                     # diffusers' numpy-2 deprecations, by the 100k
    for label, cls, init, step_kw, stochastic, cfg in diffusers_configs():
        try:
            per_nfe = diffusers_steps_per_nfe(cls, init)
        except (ValueError, NotImplementedError, ImportError):
            per_nfe = {}
        if not per_nfe:
            refused += 1
            continue
        for nfe, (steps, expect) in per_nfe.items():
            sched = cls(**init)
            sched.set_timesteps(steps)
            sig = (label, tuple(sorted((k, v) for k, v in init.items() if k not in GRID_OPTIONS
                                       and k not in SIGMA_OPTIONS and k != "tau_func")), steps,
                   _grid_signature(sched))
            if sig in seen:
                continue
            seen.add(sig)
            try:
                x, calls = run_diffusers(model, cls, init, step_kw, steps, x_T, SEED)
            except ValueError as e:                     # e.g. a NaN timestep from the scheduler
                msg = f"{label} [{cfg} steps={steps}]: {e}"
                if msg not in failed:
                    failed.append(msg)
                continue
            assert calls == expect, (label, cfg, steps, calls, expect)
            runs += 1
            m = stick.measure(x, deterministic=not stochastic)
            rows[nfe].append(dict(who="diffusers", label=label, cfg=f"{cfg} steps={steps}".strip(), calls=calls, **m))
    t_peers = time.perf_counter() - t_start - t_setup - t_ours

    # Keep the best config per method and NFE.
    best = {}
    for nfe, rs in rows.items():
        per = {}
        for r in rs:
            k = (r["who"], r["label"])
            if k not in per or r["sw"] < per[k]["sw"]:
                per[k] = r
        best[nfe] = list(per.values())

    total = time.perf_counter() - t_start
    header = [
        f"Sampler accuracy on an exact-score law ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"diffusers {__import__('diffusers').__version__})",
        "law: 16 equal Gaussians, std 0.1, means uniform in [-0.6, 0.6]^(3x8x8); linear betas 1e-4..0.02, T=1000; "
        "eps exact in float64; samplers in float32, no clipping",
        f"N={N} samples from the same x_T (Philox seed {SEED}); SW: {DIRECTIONS} directions x {LEVELS} quantiles, "
        "mode-weighted, vs 1024 exact samples per mode",
        f"floor (exact samples, {FLOOR_DRAWS} draws of N): SW {stick.sw_floor:.5f} +- {stick.sw_floor_sd:.5f} "
        f"(= 1.00 +- {stick.sw_floor_sd / stick.sw_floor:.2f} in the tables), TV {stick.tv_floor:.3f}",
        f"1000-step ancestral (fastddpm ddpm, {ddpm.variance}): SW/floor {anc['sw'] / stick.sw_floor:.2f}, "
        f"TV {anc['tv']:.3f} (must be at the floor: SW/floor < {AT_FLOOR})",
        f"probability-flow ODE: RK4, {ODE_STEPS} steps (rho=7 warp of sigma/alpha from t=999 to 0), float64; "
        f"rms change with {2 * ODE_STEPS} steps on {ODE_CHECK} samples: {ode_err:.1e}",
        f"ODE rms: per-element rms distance to the ODE solution; switched: samples ending in another mode than the "
        f"ODE's (deterministic samplers only)",
        f"runs: {sum(len(r) for r in rows.values())} ({runs} diffusers; {refused} diffusers configs refused); "
        f"not run: " + ", ".join(f"{k} ({v})" for k, v in NOT_RUN.items()),
        f"failed (left out): {len(failed)}" + "".join(f"\n  {f}" for f in failed),
        f"time: {total:.0f} s (setup {t_setup:.0f} s, fastddpm {t_ours:.0f} s, diffusers {t_peers:.0f} s)",
        "",
    ]
    lines, ratio_lines = list(header), []
    for nfe in NFES:
        lines += nfe_table(nfe, best[nfe], stick) + [""]
        ours, peer = _best(rows[nfe], "fastddpm", "sw"), _best(rows[nfe], "diffusers", "sw")
        ours_o, peer_o = _best(rows[nfe], "fastddpm", "ode"), _best(rows[nfe], "diffusers", "ode")   # any config
        sw_ratio = ours / peer if ours is not None and peer else None
        ode_ratio = ours_o / peer_o if ours_o is not None and peer_o else None
        ratio_lines.append(f"NFE {nfe:2d}: fastddpm best / best peer: SW {_fmt(sw_ratio, '.2f')} "
                           f"(ours {_fmt(ours and ours / stick.sw_floor, '.2f')}x floor, "
                           f"peer {_fmt(peer and peer / stick.sw_floor, '.2f')}x), ODE rms {_fmt(ode_ratio, '.2f')} "
                           f"(ours {_fmt(ours_o, '.4f')}, peer {_fmt(peer_o, '.4f')})")
        benchmark.extra_info[f"sw_ratio_nfe{nfe}"] = sw_ratio
        benchmark.extra_info[f"ode_ratio_nfe{nfe}"] = ode_ratio
    lines += ratio_lines

    path = os.environ.get("FASTDDPM_ACCURACY_OUT") or os.path.join(
        ROOT, "benchmarks", "results", f"sampler-accuracy-{datetime.date.today().isoformat()}.txt")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    SUMMARY_LINES.extend(header + ratio_lines + [f"full tables: {path}"])

    benchmark.group = "sampler accuracy"
    benchmark.extra_info.update(sw_floor=stick.sw_floor, ancestral_sw_over_floor=anc["sw"] / stick.sw_floor,
                                ode_check_rms=ode_err, seconds=total)
    benchmark.pedantic(lambda: None, rounds=1)

    assert anc["sw"] < AT_FLOOR * stick.sw_floor, f"1000-step ancestral SW {anc['sw']:.5f} is not at the floor " \
        f"{stick.sw_floor:.5f}: the harness is wrong"
    assert ode_err < 1e-4, f"the ODE reference is not converged: rms change {ode_err:.1e} with twice the steps"
