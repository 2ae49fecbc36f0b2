"""Samplers: ancestral / respaced DDPM, DDIM, DPM-Solver++(2M) and (3M), UniPC
and iPNDM, chosen by name, each a float64 coefficient table
(fastddpm.sampling.tables) run by the one fused update ops.sample_step
(fastddpm.sampling.step), eagerly or replayed from a CUDA graph
(fastddpm.sampling.graphs; the default on CUDA).

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

import torch
from tqdm.auto import tqdm

from fastddpm import ops
from fastddpm.sampling.step import StepState, denoise_step  # noqa: F401
from fastddpm.sampling.tables import (DEFAULT_SPACING, ORDERS, SAMPLERS, SPACINGS, UNIPC_VARIANTS,  # noqa: F401
                                      SamplerPlan, check_timesteps, make_plan, parse_restart, spaced_timesteps)

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
           order=None, variant=None, timesteps=None, restart=None, threshold=None, cuda_graphs=None,
           first_sample=0):
    """n samples from `model`, in batches of batch_size.

    sampler: "ddpm" (ancestral; respaced when steps < T), "ddim" (eta in [0, 1],
    default 0), "dpmpp2m" / "dpmpp3m" (DPM-Solver++(2M) / (3M)), "unipc"
    (order 1..3, variant bh1/bh2) or "ipndm" (order 1..4); steps: network
    evaluations per sample, 1..T (default T); spacing: SPACINGS (default per
    sampler: tables.DEFAULT_SPACING) or timesteps, an explicit decreasing list;
    variance: ddpm's "fixedlarge"/"fixedsmall" (default: the diffusion's): see
    tables.make_plan; restart: ddpm's (lo, hi, K) Restart sampling and threshold:
    dynamic thresholding's quantile p (needs clip), both off by default (see
    fastddpm.sampling.tables). cuda_graphs: replay one captured step per batch shape
    (default: on for CUDA devices; falls back to eager with a message if
    capture fails), or a graphs.CudaGraphRunner to keep its captured graphs
    across calls (e.g. every in-training FID of one run). first_sample: the
    index of the first image in the stream `seed`.

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
    if isinstance(first_sample, bool) or not isinstance(first_sample, int) \
            or not 0 <= first_sample <= MAX_SAMPLES - n:
        raise ValueError(f"first_sample must be an int in [0, 2^32 - n], got {first_sample!r}")
    plan = make_plan(diffusion, sampler, steps, eta, spacing, variance, order=order, variant=variant,
                     timesteps=timesteps, restart=restart, threshold=threshold)
    if plan.threshold and not clip:
        raise ValueError("dynamic thresholding (threshold) needs clip=True")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs is not False and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    runner = cuda_graphs if isinstance(cuda_graphs, CudaGraphRunner) else \
        CudaGraphRunner(log=lambda m: print(m, file=sys.stderr)) if cuda_graphs else None
    was_training = model.training
    model.eval()
    diffusion = diffusion.to(device)
    out = []
    try:
        nb = -(-n // batch_size)
        for b in range(nb):
            m = min(batch_size, n - b * batch_size)
            out.append(sample_batch(model, diffusion, m, seed, first_sample=first_sample + b * batch_size, plan=plan,
                                    device=device, precision=precision, clip=clip, progress=progress,
                                    desc=f"sampling {b + 1}/{nb}", runner=runner).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
