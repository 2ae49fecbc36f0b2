"""Ancestral sampling: the paper's Algorithm 2.

x_T ~ N(0, I); for t = T-1 .. 0: x_{t-1} = mean(x_t, eps_theta(x_t, t)) + sigma_t z
(no noise at t == 0; x0_hat clipped to [-1, 1]).
"""
import contextlib

import torch
from tqdm.auto import tqdm

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# --compile of the train and sample CLIs: eager, or a torch.compile mode
# ("reduce-overhead" replays the network in CUDA graphs).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def compile_model(model, mode):
    """`model` wrapped by torch.compile in `mode` (one of COMPILE_MODES), or
    itself for "none". Parameters stay shared with `model`, so optimizers,
    checkpoints (taken from `model`) and the EMA are unaffected. The first calls
    at each input shape pay the compilation."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return model
    return torch.compile(model, mode=mode)


def default_precision(device) -> str:
    """bf16 on a GPU that supports it, else fp32."""
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device, precision):
    """Autocast context for a precision name; fp32 means none."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.no_grad()
def sample_batch(model, diffusion, n, generator, device, precision="fp32", clip=True, progress=True,
                 desc="sampling"):
    """One batch of n samples (n, C, S, S) in [-1, 1], float32, on `device`."""
    cfg = model.config
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = torch.randn(shape, generator=generator, device=device)
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc=desc, total=diffusion.num_timesteps, disable=not progress, leave=False):
        t = torch.full((n,), i, dtype=torch.long, device=device)
        with autocast(device, precision):
            eps = model(x, t)
        noise = torch.randn(shape, generator=generator, device=device)
        x = diffusion._p_sample_step(x, t, eps.float(), noise, clip)  # t built here: no range check
    return x


@torch.no_grad()
def sample(model, diffusion, n, batch_size=256, seed=0, device=None, precision="fp32", clip=True,
           progress=True):
    """n samples from `model` by ancestral sampling, in batches of batch_size.

    Returns (n, C, S, S) float32 on the CPU, in [-1, 1]. Deterministic for a
    given (seed, batch_size, device, precision): batch i draws its noise from
    a generator seeded with seed + i.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    diffusion = diffusion.to(device)
    out = []
    try:
        nb = -(-n // batch_size)
        for b in range(nb):
            m = min(batch_size, n - b * batch_size)
            g = torch.Generator(device=device).manual_seed(seed + b)
            out.append(sample_batch(model, diffusion, m, g, device, precision, clip, progress,
                                    desc=f"sampling {b + 1}/{nb}").cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
