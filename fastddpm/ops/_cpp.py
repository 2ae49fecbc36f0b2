"""The "cpp" backend: fastddpm._C's CPU kernels (schemas in csrc/ops.cpp,
namespace fastddpm_cpp) with their fake implementations and autograd, and the
wrappers that fastddpm.ops runs for backend "cpp".

Ops: group_norm (+ add, SiLU, dropout; forward and backward; its autograd is
C++, csrc/cpu/group_norm_autograd.cpp, to keep Python off each call), q_sample
(autograd), simple_loss (its gradient comes out of the forward pass) and the
ancestral p_sample_step with given noise and every sampler's sample_step (no
autograd: sampling). Input the kernels do not take (float64 GroupNorm or
sampler step, empty tensors, gradients through a sampler step) runs the
reference. Everything here is checked by the public
ops first (fastddpm.ops.*); the C++ side checks again with TORCH_CHECK.

Dropout: the kernels draw their own mask from a counter-based hash of a seed
that torch's CPU generator supplies (torch.manual_seed makes it repeatable),
and regenerate it in the backward, so no mask is stored. Its distribution is
F.dropout's (keep with probability 1 - p, scale 1 / (1 - p)); its stream is not.
"""
import math

import torch

from fastddpm import reference
from fastddpm._ext import has_extension
from fastddpm.ops import _backend, _replay
from fastddpm.ops._backend import is_nhwc

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty_out(x, dtype=None):
    fmt = torch.channels_last if is_nhwc(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _needs_grad(*xs):
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _register():
    """Fake implementations and autograd of the fastddpm_cpp ops (only once _C loaded)."""
    lib = "fastddpm_cpp::"

    @torch.library.register_fake(lib + "group_norm")
    def _group_norm_fake(x, num_groups, weight, bias, eps, silu, add, p, seed):
        torch._check(x.dim() >= 2, lambda: "group_norm: x must be (N, C, *spatial)")
        torch._check(x.shape[1] % num_groups == 0, lambda: "group_norm: C not divisible by num_groups")
        stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float64)
        return _empty_out(x), stats, torch.empty_like(stats)

    @torch.library.register_fake(lib + "group_norm_backward")
    def _group_norm_backward_fake(dy, x, weight, bias, add, mean, rstd, num_groups, silu, p, seed,
                                  weight_grad, bias_grad, add_grad):
        torch._check(dy.shape == x.shape, lambda: "group_norm_backward: dy and x shapes differ")
        none = lambda: x.new_empty((0,))  # noqa: E731
        return (_empty_out(x), weight.new_empty(weight.shape) if weight_grad else none(),
                bias.new_empty(bias.shape) if bias_grad else none(),
                add.new_empty(add.shape) if add_grad else none())

    # group_norm's autograd is C++ (csrc/cpu/group_norm_autograd.cpp, the Autograd key)

    @torch.library.register_fake(lib + "q_sample")
    def _q_sample_fake(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
        torch._check(noise.shape == x0.shape, lambda: "q_sample: noise shape must equal x0 shape")
        torch._check(t.dim() == 1 and t.shape[0] == x0.shape[0], lambda: "q_sample: t must be (B,)")
        return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)

    def _q_setup(ctx, inputs, output):
        x0, t, noise, sqrt_abar, sqrt_one_minus_abar = inputs
        ctx.save_for_backward(t, sqrt_abar, sqrt_one_minus_abar)

    def _q_backward(ctx, grad):
        t, sqrt_abar, sqrt_one_minus_abar = ctx.saved_tensors
        zeros = torch.zeros_like(grad)
        # d x_t / d x0 = sqrt_abar[t], d x_t / d noise = sqrt_one_minus_abar[t]: the op itself
        dx0 = (torch.ops.fastddpm_cpp.q_sample(grad, t, zeros, sqrt_abar, sqrt_one_minus_abar)
               if ctx.needs_input_grad[0] else None)
        dnoise = (torch.ops.fastddpm_cpp.q_sample(zeros, t, grad, sqrt_abar, sqrt_one_minus_abar)
                  if ctx.needs_input_grad[2] else None)
        return dx0, None, dnoise, None, None

    torch.library.register_autograd(lib + "q_sample", _q_backward, setup_context=_q_setup)

    @torch.library.register_fake(lib + "simple_loss")
    def _simple_loss_fake(eps_hat, noise, compute_grad):
        torch._check(noise.shape == eps_hat.shape, lambda: "simple_loss: noise and eps_hat shapes differ")
        dtype = torch.float64 if eps_hat.dtype == torch.float64 else torch.float32
        grad = torch.empty(eps_hat.shape if compute_grad else (0,), dtype=eps_hat.dtype, device=eps_hat.device)
        return eps_hat.new_empty((), dtype=dtype), grad

    # the same schema and gradient contract as the Triton op: one autograd for both
    from fastddpm.ops.diffusion import _simple_loss_autograd, _simple_loss_setup_context
    torch.library.register_autograd(lib + "simple_loss", _simple_loss_autograd,
                                    setup_context=_simple_loss_setup_context)

    @torch.library.register_fake(lib + "p_sample_step")
    def _p_sample_step_fake(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var, noise, clip):
        torch._check(eps.shape == x_t.shape, lambda: "p_sample_step: eps and x_t shapes differ")
        return torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)

    @torch.library.register_fake(lib + "sample_step")
    def _sample_step_fake(x_t, eps, table, step, history, noise, rng, clip, write_x0):
        torch._check(eps.shape == x_t.shape, lambda: "sample_step: eps and x_t shapes differ")
        return (torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device),
                torch.empty(x_t.shape if write_x0 else (0,), dtype=x_t.dtype, device=x_t.device))


# ----------------------------------------------------------------------------- backend "cpp"


def new_seed():
    """A dropout seed: a (1,) int64 tensor from torch's CPU generator."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def dropout_keep_mask(seed, shape, p):
    """The keep mask (bool, `shape` = (N, C, *spatial), logical NCHW order) that the
    C++ GroupNorm applies for `seed` (a one-element int64 tensor) and probability p:
    element i is kept iff splitmix64(seed, i) >> 40 >= ceil(p 2^24)."""
    import numpy as np
    m64 = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        i = np.arange(math.prod(shape), dtype=np.uint64)
        z = np.uint64(int(seed.reshape(()).item()) & int(m64)) + (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    keep = (z >> np.uint64(40)) >= np.uint64(math.ceil(p * 2**24))
    return torch.from_numpy(keep).reshape(shape)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None, dropout=0.0):
    if x.dtype not in _DTYPES or x.numel() == 0:
        return reference.group_norm_ref(x, num_groups, weight, bias, eps, act, add, dropout)
    seed = new_seed() if dropout > 0 else None
    return torch.ops.fastddpm_cpp.group_norm.default(x, num_groups, weight, bias, float(eps), act == "silu", add,
                                                     float(dropout), seed)[0]


def q_sample(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    if x0.numel() == 0 or not sqrt_abar.is_floating_point() or not sqrt_one_minus_abar.is_floating_point():
        return reference.q_sample_ref(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)
    return torch.ops.fastddpm_cpp.q_sample(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)


def simple_loss(eps_hat, noise):
    if eps_hat.numel() == 0:
        return reference.simple_loss_ref(eps_hat, noise)
    return torch.ops.fastddpm_cpp.simple_loss(eps_hat, noise, _needs_grad(eps_hat, noise))[0]


def p_sample_step(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var, noise, clip=True):
    tables = (sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var)
    if x_t.numel() == 0 or _needs_grad(x_t, eps, noise, *tables) or not all(tb.is_floating_point() for tb in tables):
        return reference.p_sample_step_ref(x_t, t, eps, *tables, noise, clip)
    return torch.ops.fastddpm_cpp.p_sample_step(x_t, t, eps, *tables, noise, bool(clip))


def p_sample_step_seeded(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                         seed, offset=0, clip=True):
    """The reference's seeded noise (same stream as backend "reference"), the C++ update."""
    from fastddpm.ops.diffusion import _p_sample_step_seeded_ref, seeded_noise
    if x_t.dtype not in (torch.float32, torch.float64):  # the noise is fp32: keep it unrounded
        return _p_sample_step_seeded_ref(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                                         seed, offset, clip)
    z = seeded_noise(x_t, t, seed, offset).to(x_t.dtype)
    return p_sample_step(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var, z, clip)


def sample_step(x_t, eps, table, step, history, noise, rng, clip, return_x0):
    """Every sampler's update in one pass; the rng noise is drawn in C++ (the
    reference's Philox words exactly, Box-Muller to float32 rounding)."""
    given = [v for v in (history, noise) if v is not None]
    if x_t.dtype not in _DTYPES or eps.dtype not in _DTYPES or any(v.dtype not in _DTYPES for v in given) \
            or x_t.numel() == 0 or _needs_grad(x_t, eps, *given):
        return reference.sample_step_ref(x_t, eps, table, step, history, noise, rng, clip)
    x_next, x0 = torch.ops.fastddpm_cpp.sample_step(x_t, eps, table, step, history, noise, rng, bool(clip),
                                                    bool(return_x0))
    return x_next, (x0 if return_x0 else None)


def group_norm_replay(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None, dropout=0.0):
    """The reference with group_norm's dropout mask (its seed drawn again, the mask by
    dropout_keep_mask): what the dispatch's first-use check compares it with; None
    where no mask of its own is drawn (the check then takes the reference)."""
    if dropout == 0 or x.dtype not in _DTYPES or x.numel() == 0:
        return None
    keep = dropout_keep_mask(new_seed(), x.shape, dropout).to(x.device)
    return _replay.masked(x, num_groups, weight, bias, eps, act, add, dropout, keep)


if has_extension():
    _register()
    _backend.register("group_norm", "cpp", group_norm, replay=group_norm_replay)   # its own dropout mask
    for _op, _fn in (("q_sample", q_sample), ("simple_loss", simple_loss), ("p_sample_step", p_sample_step),
                     ("p_sample_step_seeded", p_sample_step_seeded), ("sample_step", sample_step)):
        _backend.register(_op, "cpp", _fn)
