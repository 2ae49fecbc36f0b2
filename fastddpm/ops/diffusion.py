"""Diffusion ops: q_sample, L_simple and the ancestral sampler step.

Coefficient tables are 1-D tensors of length T on the inputs' device (any float
dtype; GaussianDiffusion keeps them in float64); each sample's coefficients are
gathered by its t. Callers (GaussianDiffusion) check t's range.

Backends: "reference" (fastddpm.reference), "cpp" (fastddpm/ops/_cpp.py) and "triton": the
custom ops torch.ops.fastddpm.q_sample, .simple_loss and .p_sample_step (fake
implementations, autograd for the first two), usable under torch.compile and
inside CUDA graphs. The Triton kernels are imported on first use.

Sampler noise: `p_sample_step(..., noise=z)` adds the given z (every backend
gives the same result). `p_sample_step(..., noise=None, seed=s, offset=o)` draws
z itself, deterministically for (s, o, t, element):
  * triton: Philox inside the kernel (key s, counter (element, t[b], o));
    no host sync, no generator state: capturable in a CUDA graph.
  * reference/cpp: torch.randn from a torch.Generator seeded from (s, o, t);
    it reads t on the host (eager only).
Only the noise source differs between backends: the same (s, o) gives
different, equally distributed z on each; the math around z is identical.
"""
import hashlib
from typing import Optional

import torch

from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float, check_same, check_table, check_timesteps

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_batch(x, t):
    """x batched, t (B,) int64 on x's device; the range is the caller's to check
    (the kernels clamp t, so a bad value can never read out of bounds)."""
    if x.dim() < 1:
        raise ValueError("expected a batched tensor (B, ...)")
    check_timesteps(t, x.shape[0], None, x.device, check_range=False)


def q_sample(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    """x_t = sqrt_abar[t] * x0 + sqrt_one_minus_abar[t] * noise, per sample."""
    check_float("x0", x0)
    check_same("noise", noise, "x0", x0)
    _check_batch(x0, t)
    check_table("sqrt_abar", sqrt_abar, x0.device)
    check_table("sqrt_one_minus_abar", sqrt_one_minus_abar, x0.device)
    return _backend.pick("q_sample", x0.device)(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)


def simple_loss(eps_hat, noise):
    """L_simple = mean((noise - eps_hat)^2), a float32 scalar (float64 for float64)."""
    check_float("eps_hat", eps_hat)
    check_same("noise", noise, "eps_hat", eps_hat)
    return _backend.pick("simple_loss", eps_hat.device)(eps_hat, noise)


def p_sample_step(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                  noise=None, clip=True, *, seed=None, offset=0):
    """x_{t-1} from x_t and eps_hat: see reference.p_sample_step_ref. No noise at t == 0.

    Give either `noise` (a tensor like x_t) or `seed` (an int in [0, 2^63)) with an
    optional stream `offset` (int in [0, 2^64)); with a seed the noise is drawn
    per (seed, offset, t, element): see the module docstring for how backends differ.
    A sampler that visits the same t twice with one seed must change `offset`.
    """
    check_float("x_t", x_t)
    check_same("eps", eps, "x_t", x_t)
    if noise is not None:
        if seed is not None:
            raise ValueError("p_sample_step: give noise or seed, not both")
        check_same("noise", noise, "x_t", x_t)
    elif seed is None:
        raise ValueError("p_sample_step: noise is None, so seed (an int) is required")
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"p_sample_step: seed must be an int in [0, 2^63), got {seed!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**64:
            raise ValueError(f"p_sample_step: offset must be an int in [0, 2^64), got {offset!r}")
    _check_batch(x_t, t)
    tables = (sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var)
    for name, tab in zip(("sqrt_recip_abar", "sqrt_recipm1_abar", "coef1", "coef2", "log_var"), tables):
        check_table(name, tab, x_t.device)
    if noise is not None:
        return _backend.pick("p_sample_step", x_t.device)(x_t, t, eps, *tables, noise, clip)
    return _backend.pick("p_sample_step_seeded", x_t.device)(x_t, t, eps, *tables, seed, offset, clip)


def seeded_noise(x_t, t, seed, offset=0):
    """Noise of the reference path of the seeded step: torch.randn like x_t (fp32
    compute dtype, fp64 for fp64) from a generator seeded by a hash of
    (seed, offset, t). Reads t on the host."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little") + int(offset).to_bytes(8, "little"))
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    gen = torch.Generator(device=x_t.device)
    gen.manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    return torch.randn(x_t.shape, generator=gen, device=x_t.device, dtype=dtype)


def _p_sample_step_seeded_ref(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                              seed, offset=0, clip=True):
    z = seeded_noise(x_t, t, seed, offset)
    return reference.p_sample_step_ref(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2,
                                       log_var, z, clip)


# ----------------------------------------------------------------------------- triton custom ops


def _kernels():
    from fastddpm.kernels import diffusion as k
    return k


def _gather(table, t, like):
    """table[t] in fp32 (fp64 for fp64), shaped (B, 1, ..., 1) to broadcast against like."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return table.index_select(0, t).to(dtype).view(-1, *([1] * (like.dim() - 1)))


@torch.library.custom_op("fastddpm::q_sample", mutates_args=())
def q_sample_op(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_abar: torch.Tensor,
                sqrt_one_minus_abar: torch.Tensor) -> torch.Tensor:
    """Triton q_sample; returns a contiguous tensor in x0's dtype."""
    return _kernels().q_sample_fwd(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)


@q_sample_op.register_fake
def _q_sample_fake(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    torch._check(noise.shape == x0.shape, lambda: "q_sample: noise and x0 shapes differ")
    return x0.new_empty(x0.shape)


def _q_sample_setup_context(ctx, inputs, output):
    x0, t, noise, sqrt_abar, sqrt_one_minus_abar = inputs
    ctx.save_for_backward(t, sqrt_abar if ctx.needs_input_grad[0] else None,
                          sqrt_one_minus_abar if ctx.needs_input_grad[2] else None)
    ctx.dtypes = (x0.dtype, noise.dtype)


def _q_sample_autograd(ctx, grad):
    t, sqrt_abar, sqrt_one_minus_abar = ctx.saved_tensors
    g = grad.to(torch.float32)
    dx0 = None if sqrt_abar is None else (g * _gather(sqrt_abar, t, g)).to(ctx.dtypes[0])
    dnoise = None if sqrt_one_minus_abar is None else (g * _gather(sqrt_one_minus_abar, t, g)).to(ctx.dtypes[1])
    return dx0, None, dnoise, None, None


q_sample_op.register_autograd(_q_sample_autograd, setup_context=_q_sample_setup_context)


@torch.library.custom_op("fastddpm::simple_loss", mutates_args=())
def simple_loss_op(eps_hat: torch.Tensor, noise: torch.Tensor, compute_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton L_simple: (loss fp32 0-dim, d loss/d eps_hat for a unit upstream
    gradient, contiguous in eps_hat's dtype; an empty (0,) tensor unless compute_grad)."""
    return _kernels().simple_loss_fwd(eps_hat, noise, compute_grad)


@simple_loss_op.register_fake
def _simple_loss_fake(eps_hat, noise, compute_grad):
    torch._check(noise.shape == eps_hat.shape, lambda: "simple_loss: noise and eps_hat shapes differ")
    grad = eps_hat.new_empty(eps_hat.shape if compute_grad else (0,))
    return eps_hat.new_empty((), dtype=torch.float32), grad


def _simple_loss_setup_context(ctx, inputs, output):
    eps_hat, noise, compute_grad = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.noise_dtype = noise.dtype


def _simple_loss_autograd(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        raise RuntimeError("fastddpm::simple_loss was called with compute_grad=False; "
                           "call it with compute_grad=True to differentiate it")
    d_eps = grad * grad_loss if (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) else None
    d_noise = (-d_eps).to(ctx.noise_dtype) if ctx.needs_input_grad[1] else None
    return d_eps if ctx.needs_input_grad[0] else None, d_noise, None


simple_loss_op.register_autograd(_simple_loss_autograd, setup_context=_simple_loss_setup_context)


@torch.library.custom_op("fastddpm::p_sample_step", mutates_args=())
def p_sample_step_op(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                     sqrt_recip_abar: torch.Tensor, sqrt_recipm1_abar: torch.Tensor,
                     coef1: torch.Tensor, coef2: torch.Tensor, log_var: torch.Tensor,
                     noise: Optional[torch.Tensor], clip: bool, seed: int, offset: int) -> torch.Tensor:
    """Triton ancestral step; noise None draws Philox normals from (seed, offset).
    `offset` is passed as a signed int64 (the schema's int); it is reinterpreted
    as unsigned. No autograd (sampling)."""
    return _kernels().p_sample_step_fwd(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2,
                                        log_var, noise, clip, seed, offset % 2**64)


@p_sample_step_op.register_fake
def _p_sample_step_fake(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                        noise, clip, seed, offset):
    torch._check(eps.shape == x_t.shape, lambda: "p_sample_step: eps and x_t shapes differ")
    return x_t.new_empty(x_t.shape)


def _as_int64(offset):
    """An unsigned 64-bit offset as the signed int the op schema carries."""
    return offset - 2**64 if offset >= 2**63 else offset


def _needs_grad(*xs):
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _q_sample_triton(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    if x0.dtype not in _KERNEL_DTYPES or x0.numel() == 0 or not sqrt_abar.is_floating_point() \
            or not sqrt_one_minus_abar.is_floating_point():
        return reference.q_sample_ref(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)
    return torch.ops.fastddpm.q_sample(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)


def _simple_loss_triton(eps_hat, noise):
    if eps_hat.dtype not in _KERNEL_DTYPES or eps_hat.numel() == 0:
        return reference.simple_loss_ref(eps_hat, noise)
    return torch.ops.fastddpm.simple_loss(eps_hat, noise, _needs_grad(eps_hat, noise))[0]


def _p_sample_step_triton(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                          noise, clip=True):
    tables = (sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var)
    if x_t.dtype not in _KERNEL_DTYPES or x_t.numel() == 0 or _needs_grad(x_t, eps, noise, *tables) \
            or not all(tab.is_floating_point() for tab in tables):
        return reference.p_sample_step_ref(x_t, t, eps, *tables, noise, clip)
    return torch.ops.fastddpm.p_sample_step(x_t, t, eps, *tables, noise, bool(clip), 0, 0)


def _p_sample_step_seeded_triton(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                                 seed, offset=0, clip=True):
    tables = (sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var)
    if x_t.dtype not in _KERNEL_DTYPES or x_t.numel() == 0 or _needs_grad(x_t, eps, *tables) \
            or not all(tab.is_floating_point() for tab in tables):
        return _p_sample_step_seeded_ref(x_t, t, eps, *tables, seed, offset, clip)
    if x_t.numel() >= 2**32:
        raise ValueError(f"p_sample_step: in-kernel noise needs fewer than 2^32 elements, got {x_t.numel()}")
    return torch.ops.fastddpm.p_sample_step(x_t, t, eps, *tables, None, bool(clip), int(seed),
                                            _as_int64(int(offset)))


_backend.register("q_sample", "reference", reference.q_sample_ref)
_backend.register("q_sample", "triton", _q_sample_triton)
_backend.register("simple_loss", "reference", reference.simple_loss_ref)
_backend.register("simple_loss", "triton", _simple_loss_triton)
_backend.register("p_sample_step", "reference", reference.p_sample_step_ref)
_backend.register("p_sample_step", "triton", _p_sample_step_triton)
_backend.register("p_sample_step_seeded", "reference", _p_sample_step_seeded_ref)
_backend.register("p_sample_step_seeded", "triton", _p_sample_step_seeded_triton)
