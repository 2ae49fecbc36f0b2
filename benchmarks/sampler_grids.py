"""Every fastddpm sampler, order and timestep spacing at each NFE on the accuracy
benchmark's exact-score law: the table that sets the default grids
(fastddpm.sampling.tables.DEFAULT_SPACING: the best at 10 NFE).

Same law, x_T, samplers and metrics as benchmarks/test_sampler_accuracy.py (it
reuses that module), deterministic samplers only, every config kept instead of
the best per method. Each cell: SW/floor / ODE rms. Run (about 2 minutes on 2
cores):  python benchmarks/sampler_grids.py [OUT]
(default OUT: benchmarks/results/sampler-grids-<date>.txt).
"""
import collections
import datetime
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_sampler_accuracy as bench  # noqa: E402
from fastddpm import GaussianDiffusion  # noqa: E402
from fastddpm.sampling import tables  # noqa: E402


def main(out=None):
    torch.set_num_threads(1)          # small calls: see test_sampler_accuracy.one_thread
    diffusion = GaussianDiffusion.linear(T=1000, beta_start=1e-4, beta_end=0.02)
    abar = diffusion.alphas_cumprod.to(torch.float64)
    law = bench.GaussianMixture(modes=16, shape=(3, 8, 8), std=0.1, spread=0.6, seed=0)
    model = bench.ExactEps(law, abar)
    bench.run_fastddpm(model, diffusion, tables.make_plan(diffusion, "ddpm", steps=diffusion.num_timesteps))
    x_T = model.first_input.clone()          # the same x_T as the benchmark's
    sigma_max = math.sqrt((1 - abar[-1].item()) / abar[-1].item())
    stick = bench.Yardstick(law, bench.probability_flow(law, x_T, sigma_max, bench.ODE_STEPS))
    cells = collections.defaultdict(dict)
    for label, _, plan in bench.fastddpm_configs(diffusion):
        if plan.stochastic:
            continue
        x, _ = bench.run_fastddpm(model, diffusion, plan)
        m = stick.measure(x, deterministic=True)
        cells[(plan.steps, label)][plan.spacing] = (m["sw"] / stick.sw_floor, m["ode"])
    spacings = [s for s in tables.SPACINGS if any(s in d for d in cells.values())]
    lines = [f"fastddpm samplers x timestep spacings on the exact-score law of test_sampler_accuracy.py "
             f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__})",
             "cell: SW/floor / ODE rms (lower is better; * = lowest ODE rms in the row); "
             f"defaults: {tables.DEFAULT_SPACING}",
             f"{'NFE':>3} {'sampler':16}" + "".join(f"{s:>18}" for s in spacings)]
    for (nfe, label), d in sorted(cells.items()):
        best = min(d, key=lambda s: d[s][1])
        lines.append(f"{nfe:3d} {label:16}" + "".join(
            f"{'-':>18}" if s not in d else f"{d[s][0]:8.2f} /{d[s][1]:7.4f}{'*' if s == best else ' '}"
            for s in spacings))
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              f"sampler-grids-{datetime.date.today():%Y-%m-%d}.txt")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
