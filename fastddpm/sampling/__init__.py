"""Samplers: ancestral / respaced DDPM, DDIM and DPM-Solver++(2M), chosen by
name, each a float64 coefficient table (fastddpm.sampling.tables) run by the one
fused update ops.sample_step, eagerly or replayed from a CUDA graph
(fastddpm.sampling.graphs; the default on CUDA).

One denoising step: t = timesteps[step]; eps = model(x, t); x, x0_prev =
sample_step(x, eps, table[step], x0_prev, z(rng)); step += 1; rng.offset += 1.
All of it reads and writes device tensors only, so one captured step replays
for every step with no host synchronisation.

Noise: image i (counted over the whole call, from 0) gets the Philox stream
(key = seed, sample index i): x_T at offset 0, step k's noise at offset k + 1
(reference.philox_normal_ref). So an image's noise depends only on (seed, i):
`n` only chooses how many images (a smaller n gives a prefix of a larger one),
`batch_size` only how many are denoised at once (the network then sees other
batch shapes, so results across batch sizes agree up to the network's
floating-point differences, not bit for bit), and different seeds never share a
stream (seeds 0, 1, 2, ... shard a large sample without duplicates).
"""
import contextlib
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastddpm import ops, reference
from fastddpm.runtime import autocast
from fastddpm.sampling.tables import (DEFAULT_SPACING, SAMPLERS, SPACINGS, SamplerPlan,  # noqa: F401
                                      make_plan, spaced_timesteps)

MAX_SEED = 2**63 - 1
MAX_SAMPLES = 2**32          # sample indices are one 32-bit Philox counter word


class NonFiniteSamplesError(ValueError):
    """The network produced NaN or inf outputs while sampling (e.g. NaN weights)."""


@contextlib.contextmanager
def before_each_call(fn, *modules):
    """Within the block fn() runs before every forward of each module: a caller
    abandons long sampling or scoring by raising from it. fn None: nothing."""
    hooks = [m.register_forward_pre_hook(lambda module, args: fn()) for m in modules] if fn else []
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@dataclass
class StepState:
    """Everything one denoising step reads and writes, on the device (fixed
    addresses: a CUDA graph captures them)."""
    x: torch.Tensor            # (B, C, H, W) float32, the current sample
    x0_prev: torch.Tensor      # like x: the previous step's x0_hat (multistep samplers), else (0,)
    step: torch.Tensor         # (1,) int64: the table row of the next step
    rng: torch.Tensor          # (3,) int64: Philox key (seed), offset, first sample index
    health: torch.Tensor       # (1,) float32: running sum of eps_hat (NaN/inf stick)
    table: torch.Tensor        # (N, 6) float64 coefficients
    timesteps: torch.Tensor    # (N,) int64 network timesteps
    stochastic: bool           # whether steps add noise (else no Philox work)

    @classmethod
    def allocate(cls, plan, shape, device):
        return cls(x=torch.empty(shape, device=device),
                   x0_prev=torch.zeros(shape if plan.multistep else (0,), device=device),
                   step=torch.zeros(1, dtype=torch.int64, device=device),
                   rng=torch.zeros(3, dtype=torch.int64, device=device),
                   health=torch.zeros(1, dtype=torch.float32, device=device),
                   table=plan.table.to(device),
                   timesteps=torch.tensor(plan.timesteps, dtype=torch.int64, device=device),
                   stochastic=plan.stochastic)

    def reset(self, seed, first_sample):
        """Start a batch: x = x_T from (seed, first_sample) at offset 0, step 0."""
        self.rng.copy_(torch.tensor([seed, 0, first_sample], dtype=torch.int64))
        self.x.copy_(reference.philox_normal_ref(self.rng, tuple(self.x.shape)))
        self.rng[1:2].fill_(1)
        self.step.zero_()
        self.x0_prev.zero_()
        self.health.zero_()


def denoise_step(model, state, precision, clip):
    """One step of the plan held in `state`, in place; no host synchronisation."""
    x = state.x
    t = state.timesteps.index_select(0, state.step).expand(x.shape[0])
    # cache_enabled=False: no cast cache kept across a CUDA-graph capture
    with autocast(x.device, precision, cache_enabled=False):
        eps = model(x, t)
    if eps.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    state.health.add_(eps.detach().sum(dtype=torch.float32))
    multistep = state.x0_prev.numel() > 0
    x_next, x0 = ops.sample_step(x, eps.detach(), state.table, state.step,
                                 state.x0_prev if multistep else None,
                                 rng=state.rng if state.stochastic else None, clip=clip,
                                 return_x0=multistep, check_range=False)   # step built here
    x.copy_(x_next)
    if multistep:
        state.x0_prev.copy_(x0)
    state.step.add_(1)
    state.rng[1:2].add_(1)


def _check_finite(state, where):
    if not bool(torch.isfinite(state.health).all() and torch.isfinite(state.x).all()):
        raise NonFiniteSamplesError(f"the network produced non-finite outputs (NaN or inf) {where}; "
                                    "are its weights finite?")


@torch.no_grad()
def sample_batch(model, diffusion, n, seed=0, *, first_sample=0, plan=None, device=None, precision="fp32",
                 clip=True, progress=True, desc="sampling", runner=None):
    """Samples first_sample .. first_sample + n - 1 of the stream `seed` (see the
    module docstring): (n, C, S, S) float32 on `device`, in [-1, 1] when clipping.
    plan: a SamplerPlan (default: ancestral DDPM over all T steps); runner: a
    graphs.CudaGraphRunner to replay captured steps, or None for eager."""
    plan = make_plan(diffusion) if plan is None else plan
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    bar = tqdm(total=plan.steps, desc=desc, disable=not progress, leave=False)
    try:
        state = runner.run(model, plan, shape, device, precision, clip, seed, first_sample, bar) \
            if runner is not None else None
        if state is None:
            state = StepState.allocate(plan, shape, device)
            state.reset(seed, first_sample)
            for _ in range(plan.steps):
                denoise_step(model, state, precision, clip)
                bar.update(1)
    finally:
        bar.close()
    _check_finite(state, f"in samples {first_sample}..{first_sample + n - 1}")
    return state.x.clone()


@torch.no_grad()
def sample(model, diffusion, n, batch_size=256, seed=0, device=None, precision="fp32", clip=True,
           progress=True, *, sampler="ddpm", steps=None, eta=None, spacing=None, variance=None,
           cuda_graphs=None):
    """n samples from `model`, in batches of batch_size.

    sampler: "ddpm" (ancestral; respaced when steps < T), "ddim" (eta in [0, 1],
    default 0) or "dpmpp2m" (DPM-Solver++(2M)); steps: network evaluations per
    sample, 1..T (default T); spacing: "uniform", "quadratic" or "logsnr"
    timesteps (default: uniform for ddpm, quadratic for ddim, logsnr for dpmpp2m);
    variance: ddpm's "fixedlarge"/"fixedsmall" (default: the diffusion's).
    cuda_graphs: replay one captured step per batch shape (default: on for CUDA
    devices; falls back to eager with a message if capture fails).

    Returns (n, C, S, S) float32 on the CPU, in [-1, 1] when clip. Reproducible: image i
    depends only on (seed, i) (a smaller n gives a prefix of a larger one), up
    to the network's floating-point differences between batch sizes when
    batch_size changes; different seeds give disjoint streams. Raises
    NonFiniteSamplesError (a ValueError) if the network outputs NaN or inf.
    """
    from fastddpm.sampling.graphs import CudaGraphRunner

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be an int in [1, 2^32], got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    plan = make_plan(diffusion, sampler, steps, eta, spacing, variance)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    runner = CudaGraphRunner(log=lambda m: print(m, file=sys.stderr)) if cuda_graphs else None
    was_training = model.training
    model.eval()
    diffusion = diffusion.to(device)
    out = []
    try:
        nb = -(-n // batch_size)
        for b in range(nb):
            m = min(batch_size, n - b * batch_size)
            out.append(sample_batch(model, diffusion, m, seed, first_sample=b * batch_size, plan=plan,
                                    device=device, precision=precision, clip=clip, progress=progress,
                                    desc=f"sampling {b + 1}/{nb}", runner=runner).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
