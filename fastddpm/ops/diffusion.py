"""Diffusion ops: q_sample, L_simple, the ancestral step and the sampler step.

Coefficient tables are 1-D tensors of length T on the inputs' device (any float
dtype; GaussianDiffusion keeps them in float64); each sample's coefficients are
gathered by its t. Every backend refuses the same bad input: tables of unequal
length and t outside [0, T-1] raise ValueError. The range check reads t on the
host; it is skipped under CUDA-graph capture and torch.compile, and by callers
that built t themselves and pass check_range=False (GaussianDiffusion, the
samplers) to avoid a device sync. The kernels clamp t in any case, so they never
read out of bounds.

Backends: "reference" (fastddpm.reference), "cpp" (fastddpm/ops/_cpp.py) and
"triton": the custom ops torch.ops.fastddpm.q_sample, .simple_loss,
.p_sample_step and .sample_step (fake implementations, autograd for the first
two), usable under torch.compile and inside CUDA graphs. The Triton kernels are
imported on first use.

Ancestral-step noise: `p_sample_step(..., noise=z)` adds the given z (every
backend gives the same result). `p_sample_step(..., noise=None, seed=s, offset=o)`
draws z itself, deterministically for (s, o, t, element): Philox with key s
and counter (element, t[b], o) (reference.seeded_step_noise_ref), inside the
Triton kernel, as device tensor ops on the reference and C++ paths: the same
normals on every backend (to float32 rounding of log/cos), no host sync, no
generator state.

The sampler step (`sample_step`, used by every sampler in fastddpm.sampling)
keeps its whole state on the device instead: the table row is a device int64
`step` and the noise comes from a device int64 `rng` = (key, offset,
first_sample) through reference.philox_normal_ref, which the Triton kernel
computes in-kernel (the same Philox numbers on every backend, the normals equal
to float32 rounding of log/cos). Nothing is read on the host (except the
optional range check), so a CUDA graph can advance step and rng[1] on the
device and draw fresh noise on every replay.
"""
import math
from typing import Optional

import torch

from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float, check_same, check_tables, check_timesteps, no_sync

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NUM_COEFS = len(reference.SAMPLER_COEFS)
MAX_HISTORY = reference.MAX_HISTORY


def _check_batch(x, t, T, check_range):
    """x batched, t (B,) int64 on x's device with values in [0, T-1] (the range
    read on the host unless check_range is False, or under capture/compile)."""
    if x.dim() < 1:
        raise ValueError("expected a batched tensor (B, ...)")
    check_timesteps(t, x.shape[0], T, x.device, check_range=check_range)


def q_sample(x0, t, noise, sqrt_abar, sqrt_one_minus_abar, *, check_range=True):
    """x_t = sqrt_abar[t] * x0 + sqrt_one_minus_abar[t] * noise, per sample.
    check_range=False skips reading t on the host (for callers that built t)."""
    check_float("x0", x0)
    check_same("noise", noise, "x0", x0)
    T = check_tables({"sqrt_abar": sqrt_abar, "sqrt_one_minus_abar": sqrt_one_minus_abar}, x0.device)
    _check_batch(x0, t, T, check_range)
    return _backend.call("q_sample", x0.device, x0, t, noise, sqrt_abar, sqrt_one_minus_abar)


def simple_loss(eps_hat, noise):
    """L_simple = mean((noise - eps_hat)^2), a float32 scalar (float64 for float64)."""
    check_float("eps_hat", eps_hat)
    check_same("noise", noise, "eps_hat", eps_hat)
    return _backend.call("simple_loss", eps_hat.device, eps_hat, noise)


def p_sample_step(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                  noise=None, clip=True, *, seed=None, offset=0, check_range=True):
    """x_{t-1} from x_t and eps_hat: see reference.p_sample_step_ref. No noise at t == 0.

    Give either `noise` (a tensor like x_t) or `seed` (an int in [0, 2^63)) with an
    optional stream `offset` (int in [0, 2^64)); with a seed the noise is drawn
    per (seed, offset, t, element): see the module docstring for how backends differ.
    A sampler that visits the same t twice with one seed must change `offset`.
    check_range=False skips reading t on the host (for callers that built t).
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
    tables = (sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var)
    T = check_tables(dict(zip(("sqrt_recip_abar", "sqrt_recipm1_abar", "coef1", "coef2", "log_var"), tables)),
                     x_t.device)
    _check_batch(x_t, t, T, check_range)
    if noise is not None:
        return _backend.call("p_sample_step", x_t.device, x_t, t, eps, *tables, noise, clip)
    return _backend.call("p_sample_step_seeded", x_t.device, x_t, t, eps, *tables, seed, offset, clip)


def sample_step(x_t, eps, table, step, history=None, noise=None, *, rng=None, clip=True, return_x0=False,
                check_range=True):
    """One step of any sampler (reference.sample_step_ref, SAMPLER_COEFS):
    x0_hat = a_x x_t - a_e eps (clipped if clip); x_next = c_x x_t + c_0 x0_hat
    + sum_j c_j H_{step-j} + sigma z, and H_step = h_x x_t + h_0 x0_hat written
    into `history` in place. Returns (x_next, x0_hat if return_x0 else None),
    in x_t's dtype.

    x_t: (B, ...) float; eps: like x_t (any float dtype: a bf16 network output
    needs no cast); table: (S, 11) float coefficients on x_t's device; step: (1,)
    int64 on the device, the row (in [0, S-1]); history: None, or the ring
    (K + 1, *x_t.shape) in x_t's dtype holding the last K predictions (K in
    [1, 4]; H_i in slot i mod (K + 1)); noise: z like x_t, or None with `rng`,
    a (3,) int64 device tensor (key, offset, first_sample) from which z is drawn
    (reference.philox_normal_ref); neither: no noise term (deterministic
    samplers: no Philox work at all).
    The caller advances step and rng[1] between steps, on the device.
    check_range=False skips reading step on the host (for callers that built it).
    """
    check_float("x_t", x_t)
    check_float("eps", eps)
    check_same("eps", eps, "x_t", x_t, dtype=False)
    if x_t.dim() < 1:
        raise ValueError("x_t must be batched (B, ...)")
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != NUM_COEFS \
            or table.shape[0] < 1:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be a (S, {NUM_COEFS}) tensor of sampler coefficients, got {got}")
    check_float("table", table)
    if table.device != x_t.device:
        raise ValueError(f"table is on {table.device}, expected {x_t.device}")
    if history is not None:
        _check_history(history, x_t)
    if noise is not None and rng is not None:
        raise ValueError("sample_step: give noise or rng, not both")
    if noise is not None:
        check_same("noise", noise, "x_t", x_t, dtype=False)
        check_float("noise", noise)
    elif rng is not None:
        _check_device_ints("rng", rng, (3,), x_t.device)
        per_sample = math.prod(x_t.shape[1:])   # not x_t[0]: an empty batch has no sample 0
        if per_sample >= 2**32:
            raise ValueError(f"sample_step: in-kernel noise needs fewer than 2^32 elements per sample, "
                             f"got {per_sample}")
    _check_device_ints("step", step, (1,), x_t.device)
    if check_range and not no_sync():
        i = int(step)
        if not 0 <= i < table.shape[0]:
            raise ValueError(f"step must lie in [0, {table.shape[0] - 1}] (the table's rows), got {i}")
    x_next, x0 = _backend.call("sample_step", x_t.device, x_t, eps, table, step, history, noise, rng, clip,
                               return_x0)
    return x_next, (x0 if return_x0 else None)


def _check_history(history, x_t):
    if not isinstance(history, torch.Tensor) or history.dim() != x_t.dim() + 1 \
            or tuple(history.shape[1:]) != tuple(x_t.shape) or not 2 <= history.shape[0] <= MAX_HISTORY + 1:
        got = tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
        raise ValueError(f"history must be a ring (K + 1, {', '.join(map(str, x_t.shape))}) with K in "
                         f"[1, {MAX_HISTORY}], got {got}")
    if history.dtype != x_t.dtype:
        raise TypeError(f"history has dtype {history.dtype}, expected x_t's {x_t.dtype}")
    if history.device != x_t.device:
        raise ValueError(f"history is on {history.device}, expected {x_t.device}")
    if not history.is_contiguous():
        raise ValueError("history must be contiguous (the step writes into it in place)")


def _check_device_ints(name, x, shape, device):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or tuple(x.shape) != shape:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be an int64 tensor of shape {shape}, got {got}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")


def _sample_step_ref(x_t, eps, table, step, history, noise, rng, clip, return_x0):
    x_next, x0 = reference.sample_step_ref(x_t, eps, table, step, history, noise, rng, clip)
    return x_next, (x0 if return_x0 else None)   # what every backend returns (the dispatch compares it)


_H_COLS = [reference.SAMPLER_COEFS.index(c) for c in ("a_x", "a_e", "h_x", "h_0")]


def _history_rounding_scale(x_t, eps, table, step, *rest):
    """What the history ring's entry H = h_x x + h_0 x0_hat, x0_hat = a_x x - a_e eps,
    amplifies the rounding of x and eps by: ~|h_x| + |h_0| (a_x + a_e). At the
    paper's t = 999, a_x ~ a_e ~ 157 and x ~ eps: two correct float32 computations of
    x0_hat differ by ~5e-5 relative (seen in the first-use check). Read on the host:
    the check runs eagerly only."""
    row = table[min(max(int(step.reshape(-1)[0]), 0), table.shape[0] - 1)]
    a_x, a_e, h_x, h_0 = (abs(float(row[c])) for c in _H_COLS)
    return max(1.0, h_x + h_0 * (a_x + a_e))


def seeded_noise(x_t, t, seed, offset=0):
    """Noise of the seeded step on the reference and C++ paths:
    reference.seeded_step_noise_ref (the Triton kernel's Philox numbers), float32
    (float64 for float64 x_t), like x_t. Nothing is read on the host."""
    z = reference.seeded_step_noise_ref(tuple(x_t.shape), t, seed, offset)
    return z.to(torch.float64) if x_t.dtype == torch.float64 else z


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
        raise RuntimeError("simple_loss was called with compute_grad=False; "
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


@torch.library.custom_op("fastddpm::sample_step", mutates_args=("history",))
def sample_step_op(x_t: torch.Tensor, eps: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
                   history: Optional[torch.Tensor], noise: Optional[torch.Tensor], rng: Optional[torch.Tensor],
                   clip: bool, write_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton sampler step: (x_next, x0_hat or an empty (0,) tensor unless write_x0);
    writes this step's prediction into the history ring. No autograd (sampling)."""
    return _kernels().sample_step_fwd(x_t, eps, table, step, history, noise, rng, clip, write_x0)


@sample_step_op.register_fake
def _sample_step_fake(x_t, eps, table, step, history, noise, rng, clip, write_x0):
    torch._check(eps.shape == x_t.shape, lambda: "sample_step: eps and x_t shapes differ")
    return x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape if write_x0 else (0,))


def _sample_step_triton(x_t, eps, table, step, history, noise, rng, clip, return_x0):
    if x_t.dtype not in _KERNEL_DTYPES or eps.dtype not in _KERNEL_DTYPES or x_t.numel() == 0 \
            or _needs_grad(x_t, eps, *(v for v in (history, noise) if v is not None)):
        return _sample_step_ref(x_t, eps, table, step, history, noise, rng, clip, return_x0)
    x_next, x0 = torch.ops.fastddpm.sample_step(x_t, eps, table, step, history, noise, rng, bool(clip),
                                                bool(return_x0))
    return x_next, (x0 if return_x0 else None)


_backend.register("q_sample", "reference", reference.q_sample_ref)
_backend.register("q_sample", "triton", _q_sample_triton)
_backend.register("simple_loss", "reference", reference.simple_loss_ref)
_backend.register("simple_loss", "triton", _simple_loss_triton)
_backend.register("p_sample_step", "reference", reference.p_sample_step_ref)
_backend.register("p_sample_step", "triton", _p_sample_step_triton)
_backend.register("p_sample_step_seeded", "reference", _p_sample_step_seeded_ref)
_backend.register("p_sample_step_seeded", "triton", _p_sample_step_seeded_triton)
_backend.register("sample_step", "reference", _sample_step_ref, mutates=(4,),   # writes the history ring
                  mutated_scale=_history_rounding_scale)
_backend.register("sample_step", "triton", _sample_step_triton)
