"""Diffusion elementwise kernels: q_sample, L_simple (+ its gradient), and the
fused ancestral sampler step, with thin launchers.

Per-sample coefficients are gathered inside the kernels: one program handles a
block of one sample, loads t[b] once and the table entries once (tables are
1-D of length T, any float dtype; float64 tables are loaded and converted to
fp32, exactly as the reference's `table[t].to(float32)`). Tensors are viewed as
(B, D) contiguous; the launchers make non-contiguous inputs contiguous once and
return contiguous outputs. Timestep values are clamped to [0, shortest table - 1]
inside the kernels so a bad t can never read out of bounds; range and length
errors are reported by fastddpm.ops before a launch (the clamp is the last line
of defence, e.g. inside a CUDA graph where the host cannot read t).

The sampler step of every sampler (`_sample_step_fwd_kernel`) reads its row of
a coefficient table at a step index held in a device tensor, and draws its
noise in the kernel from a Philox state held in a device tensor too.

Noise of the fused ancestral step is either given or drawn by Philox inside the
kernel from the key `seed` and the counter (element index, t[b], offset_lo,
offset_hi) (reference.seeded_step_noise_ref): every (step t, element) gets its
own normal, the same for a given seed on every run and backend, with no
generator state on the host (CUDA-graph safe).
"""
import torch
import triton
import triton.language as tl

from fastddpm.kernels._util import interpreting

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Test hook: when True, every buffer the launchers allocate is NaN-filled first.
POISON = False
# Largest grid dimension 1 (the batch axis of the 2-D launches).
_MAX_GRID_1 = 65535
# Elements per program of the elementwise kernels.
BLOCK = 1024
# Elements per program of the loss reduction (one fp32 partial each).
LOSS_BLOCK = 4096


def _empty(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _num_warps():
    return 4


@triton.jit
def _gather_coef(Table, t):
    """Table[t] as fp32 (Table: 1-D, any float dtype)."""
    return tl.load(Table + t).to(tl.float32)


@triton.jit
def _q_sample_fwd_kernel(
    X0,         # (B, D) contiguous, x0's dtype
    Noise,      # (B, D) contiguous, x0's dtype
    T,          # (B,) int64 timesteps
    SqrtAbar,   # (num_steps,) sqrt(abar_t), any float dtype
    SqrtOneMinusAbar,  # (num_steps,) sqrt(1 - abar_t), any float dtype
    Out,        # (B, D) contiguous out, x0's dtype
    D,          # elements per sample
    num_steps,  # table length T
    b_first,    # first sample of this launch (launches are chunked by 65535 samples)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1) + b_first
    t = tl.minimum(tl.maximum(tl.load(T + b), 0), num_steps - 1)
    ca = _gather_coef(SqrtAbar, t)
    cn = _gather_coef(SqrtOneMinusAbar, t)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = b.to(tl.int64) * D
    x0 = tl.load(X0 + base + offs, mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(Noise + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + base + offs, (ca * x0 + cn * nz).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _simple_loss_fwd_kernel(
    EpsHat,     # (numel,) contiguous prediction
    Noise,      # (numel,) contiguous target
    Partial,    # (num_programs,) fp32 out: sum of squared errors of each block
    Grad,       # (numel,) out, EpsHat's dtype: d loss / d eps_hat = 2 (eps_hat - noise) / numel
    numel,      # total elements
    grad_scale,  # 2 / numel
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    e = tl.load(EpsHat + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(Noise + offs, mask=mask, other=0.0).to(tl.float32)
    d = e - n
    tl.store(Partial + pid, tl.sum(d * d))
    if WRITE_GRAD:
        tl.store(Grad + offs, (d * grad_scale).to(Grad.dtype.element_ty), mask=mask)


@triton.jit
def _p_sample_step_fwd_kernel(
    Xt,         # (B, D) contiguous x_t
    Eps,        # (B, D) contiguous eps_hat, x_t's dtype
    Noise,      # (B, D) contiguous z, x_t's dtype; unused unless HAS_NOISE
    T,          # (B,) int64 timesteps
    SqrtRecipAbar,    # (num_steps,) sqrt(1 / abar_t)
    SqrtRecipm1Abar,  # (num_steps,) sqrt(1 / abar_t - 1)
    Coef1,      # (num_steps,) posterior mean coefficient of x0_hat
    Coef2,      # (num_steps,) posterior mean coefficient of x_t
    LogVar,     # (num_steps,) log-variance of the step
    Out,        # (B, D) contiguous out x_{t-1}, x_t's dtype
    D,          # elements per sample
    num_steps,  # table length T
    b_first,    # first sample of this launch
    seed,       # Philox key (int, 0 <= seed < 2^63); unused with HAS_NOISE
    offset_lo,  # Philox counter word 2 (low 32 bits of the stream offset)
    offset_hi,  # Philox counter word 3 (high 32 bits of the stream offset)
    CLIP: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1) + b_first
    t = tl.minimum(tl.maximum(tl.load(T + b), 0), num_steps - 1)
    c_recip = _gather_coef(SqrtRecipAbar, t)
    c_recipm1 = _gather_coef(SqrtRecipm1Abar, t)
    c1 = _gather_coef(Coef1, t)
    c2 = _gather_coef(Coef2, t)
    std = tl.exp(0.5 * _gather_coef(LogVar, t))
    std = tl.where(t > 0, std, 0.0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = b.to(tl.int64) * D
    x = tl.load(Xt + base + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(Eps + base + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = c_recip * x - c_recipm1 * e
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    mean = c1 * x0 + c2 * x
    if HAS_NOISE:
        z = tl.load(Noise + base + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        # counter (element, t, offset_lo, offset_hi), built in int64 so that scalar
        # arguments specialised to constants still broadcast; launcher guarantees B * D < 2^32
        elem = base + offs
        zero = elem * 0
        # normals as reference.seeded_step_noise_ref (u = ((word >> 8) + 0.5) / 2^24, Box-Muller)
        w0, w1, _, _ = tl.random.philox(seed, elem.to(tl.uint32), (zero + t).to(tl.uint32),
                                        (zero + offset_lo).to(tl.uint32), (zero + offset_hi).to(tl.uint32))
        u1 = ((w0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        u2 = ((w1 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
    tl.store(Out + base + offs, (mean + std * z).to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check_kernel_dtype(name, x):
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernel dtypes are float16, bfloat16, float32; got {x.dtype}")
    if x.device.type == "cpu" and not interpreting():
        raise ValueError(f"{name}: CPU tensors need TRITON_INTERPRET=1")


def _batched_launch(kernel, B, D, args, **meta):
    """Launch a (blocks of D, B) grid in chunks of at most 65535 samples."""
    for b0 in range(0, B, _MAX_GRID_1):
        nb = min(_MAX_GRID_1, B - b0)
        kernel[(triton.cdiv(D, BLOCK), nb)](*args(b0), BLOCK=BLOCK, num_warps=_num_warps(), **meta)


def q_sample_fwd(x0, t, noise, sqrt_abar, sqrt_one_minus_abar, *, out=None):
    """x_t = sqrt_abar[t] x0 + sqrt_one_minus_abar[t] noise per sample, in x0's dtype.
    x0, noise: (B, ...) same shape and dtype; t: int64 (B,); tables 1-D (T,).
    Returns a contiguous tensor (or writes `out`, which must be contiguous)."""
    _check_kernel_dtype("q_sample", x0)
    B = x0.shape[0]
    D = x0[0].numel() if B else 0
    x0c, nzc, tc = x0.contiguous(), noise.to(x0.dtype).contiguous(), t.contiguous()
    y = _empty(x0.shape, x0.dtype, x0.device) if out is None else out
    if y.shape != x0.shape or y.dtype != x0.dtype or not y.is_contiguous():
        raise ValueError("q_sample_fwd: out must be contiguous with x0's shape and dtype")
    if B == 0 or D == 0:
        return y
    tabs = (sqrt_abar.contiguous(), sqrt_one_minus_abar.contiguous())
    num_steps = min(tab.shape[0] for tab in tabs)   # t is clamped below this: never out of bounds
    _batched_launch(_q_sample_fwd_kernel, B, D,
                    lambda b0: (x0c, nzc, tc, *tabs, y, D, num_steps, b0))
    return y


def simple_loss_fwd(eps_hat, noise, compute_grad=True):
    """L_simple = mean((noise - eps_hat)^2) as an fp32 0-dim tensor, and in the same
    pass its gradient wrt eps_hat (2 (eps_hat - noise) / numel, eps_hat's dtype,
    contiguous) when compute_grad, else an empty (0,) tensor. Deterministic:
    one fp32 partial per block, then a sum (no atomics)."""
    _check_kernel_dtype("simple_loss", eps_hat)
    numel = eps_hat.numel()
    if numel == 0:
        raise ValueError("simple_loss: empty input")
    e, n = eps_hat.contiguous().view(-1), noise.to(eps_hat.dtype).contiguous().view(-1)
    grid = triton.cdiv(numel, LOSS_BLOCK)
    partial = _empty((grid,), torch.float32, eps_hat.device)
    grad = _empty(eps_hat.shape if compute_grad else (0,), eps_hat.dtype, eps_hat.device)
    _simple_loss_fwd_kernel[(grid,)](
        e, n, partial, grad if compute_grad else partial, numel, 2.0 / numel,
        WRITE_GRAD=bool(compute_grad), BLOCK=LOSS_BLOCK, num_warps=8 if not interpreting() else 4,
    )
    return partial.sum() / numel, grad


def p_sample_step_fwd(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                      noise=None, clip=True, seed=0, offset=0, *, out=None):
    """One fused ancestral step: x_{t-1} = mean(x_t, eps) + [t > 0] exp(0.5 log_var[t]) z.

    z is `noise` when given (same result as reference.p_sample_step_ref), else
    Philox normals from key `seed` and counter (element, t[b], offset): distinct
    for every (t, element), deterministic per seed. One read of x_t and eps,
    one write. Returns a contiguous tensor (or writes `out`)."""
    _check_kernel_dtype("p_sample_step", x_t)
    B = x_t.shape[0]
    D = x_t[0].numel() if B else 0
    if noise is None:
        if not (0 <= int(seed) < 2**63):
            raise ValueError(f"p_sample_step: seed must lie in [0, 2^63), got {seed}")
        if not (0 <= int(offset) < 2**64):
            raise ValueError(f"p_sample_step: offset must lie in [0, 2^64), got {offset}")
        if B * D >= 2**32:
            raise ValueError(f"p_sample_step: in-kernel noise needs fewer than 2^32 elements, got {B * D}")
    xc, ec, tc = x_t.contiguous(), eps.to(x_t.dtype).contiguous(), t.contiguous()
    nz = noise.to(x_t.dtype).contiguous() if noise is not None else xc
    y = _empty(x_t.shape, x_t.dtype, x_t.device) if out is None else out
    if y.shape != x_t.shape or y.dtype != x_t.dtype or not y.is_contiguous():
        raise ValueError("p_sample_step_fwd: out must be contiguous with x_t's shape and dtype")
    if B == 0 or D == 0:
        return y
    tabs = tuple(tab.contiguous() for tab in (sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var))
    num_steps = min(tab.shape[0] for tab in tabs)   # t is clamped below this: never out of bounds
    off = int(offset)
    _batched_launch(_p_sample_step_fwd_kernel, B, D,
                    lambda b0: (xc, ec, nz, tc, *tabs, y, D, num_steps, b0,
                                int(seed), off & 0xFFFFFFFF, off >> 32),
                    CLIP=bool(clip), HAS_NOISE=noise is not None)
    return y


# ----------------------------------------------------------------------------- sampler step

NUM_COEFS = 11      # columns of a sampler table (reference.SAMPLER_COEFS):
# a_x, a_e, c_x, c_0, c_1 .. c_4, h_x, h_0, sigma
MAX_HISTORY = 4     # past predictions a row can read


@triton.jit
def _sample_step_fwd_kernel(
    Xt,         # (B, D) contiguous x_t
    Eps,        # (B, D) contiguous eps_hat, any kernel dtype
    Hist,       # (HIST + 1, B, D) contiguous history ring, x_t's dtype; unused unless HIST > 0
    Noise,      # (B, D) contiguous z; unused unless NOISE == 1
    Table,      # (num_rows, 11) contiguous sampler coefficients, any float dtype
    Step,       # (1,) int64: the table row of this step (read on the device)
    Rng,        # (3,) int64: Philox key, stream offset, index of sample 0; unused unless NOISE == 2
    Out,        # (B, D) contiguous out x_next, x_t's dtype
    X0Out,      # (B, D) contiguous out x0_hat, x_t's dtype; unused unless WRITE_X0
    D,          # elements per sample
    slot_stride,  # B * D: elements per ring slot
    num_rows,   # table rows
    b_first,    # first sample of this launch (launches are chunked by 65535 samples)
    CLIP: tl.constexpr,
    HIST: tl.constexpr,          # K, past predictions read (the ring has K + 1 slots); 0: no ring
    NOISE: tl.constexpr,         # 0: none (deterministic samplers), 1: Noise, 2: Philox from Rng
    WRITE_X0: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1) + b_first
    # clamped so that a bad step can never read outside the table (ops checks the range)
    step = tl.minimum(tl.maximum(tl.load(Step), 0), num_rows - 1)
    row = Table + step * 11
    a_x = tl.load(row + 0).to(tl.float32)
    a_e = tl.load(row + 1).to(tl.float32)
    c_x = tl.load(row + 2).to(tl.float32)
    c_0 = tl.load(row + 3).to(tl.float32)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = b.to(tl.int64) * D
    x = tl.load(Xt + base + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(Eps + base + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = a_x * x - a_e * e
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    out = c_x * x + c_0 * x0
    if HIST > 0:
        # H_{step-j} sits in slot (step - j) mod (K + 1); the slot written below is not among them
        for j in tl.static_range(1, HIST + 1):
            slot = (step + (HIST + 1 - j)) % (HIST + 1)
            c_j = tl.load(row + 3 + j).to(tl.float32)
            out += c_j * tl.load(Hist + slot * slot_stride + base + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(row + 8).to(tl.float32) * x + tl.load(row + 9).to(tl.float32) * x0
        tl.store(Hist + (step % (HIST + 1)) * slot_stride + base + offs, h.to(Hist.dtype.element_ty), mask=mask)
    if NOISE == 1:
        out += tl.load(row + 10).to(tl.float32) * tl.load(Noise + base + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 2:
        # reference.philox_normal_ref: counter (d, first_sample + b, offset lo, offset hi)
        key = tl.load(Rng)
        offset = tl.load(Rng + 1)
        sample = tl.load(Rng + 2) + b
        zero = offs.to(tl.int64) * 0
        w0, w1, _, _ = tl.random.philox(key, offs.to(tl.uint32), (zero + sample).to(tl.uint32),
                                        (zero + (offset & 0xFFFFFFFF)).to(tl.uint32),
                                        (zero + ((offset >> 32) & 0xFFFFFFFF)).to(tl.uint32))
        u1 = ((w0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        u2 = ((w1 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        out += tl.load(row + 10).to(tl.float32) * (tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2))
    tl.store(Out + base + offs, out.to(Out.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(X0Out + base + offs, x0.to(X0Out.dtype.element_ty), mask=mask)


def sample_step_fwd(x_t, eps, table, step, history=None, noise=None, rng=None, clip=True, write_x0=False):
    """One step of any sampler (reference.sample_step_ref): returns (x_next, x0_hat)
    as contiguous tensors in x_t's dtype; x0_hat is an empty (0,) tensor unless
    write_x0. history: None or the contiguous ring (K + 1, *x_t.shape) in x_t's
    dtype, K in [1, 4]: the step reads the last K predictions from it and writes
    its own (in place). z is `noise` when given, Philox normals from `rng`
    ((3,) int64 on the device: key, offset, first sample index) when that is
    given, else zero (no noise term). Philox is drawn in the kernel: no host
    sync and no host-side generator state, so a CUDA graph replay that advances
    rng on the device draws fresh noise. One read of x_t, eps (and K history
    slots), one write of x_next (and the history slot, x0_hat)."""
    _check_kernel_dtype("sample_step", x_t)
    _check_kernel_dtype("sample_step", eps)
    if table.dim() != 2 or table.shape[1] != NUM_COEFS or table.shape[0] < 1:
        raise ValueError(f"sample_step: table must be (S, {NUM_COEFS}), got {tuple(table.shape)}")
    if step.shape != (1,) or step.dtype != torch.int64:
        raise ValueError("sample_step: step must be a (1,) int64 tensor")
    if noise is not None and rng is not None:
        raise ValueError("sample_step: give noise or rng, not both")
    if rng is not None and (rng.shape != (3,) or rng.dtype != torch.int64):
        raise ValueError("sample_step: rng must be a (3,) int64 tensor")
    if history is not None and (tuple(history.shape[1:]) != tuple(x_t.shape) or history.dtype != x_t.dtype
                                or not 2 <= history.shape[0] <= MAX_HISTORY + 1 or not history.is_contiguous()):
        raise ValueError(f"sample_step: history must be a contiguous ring (K + 1, *x_t.shape) in x_t's dtype, "
                         f"K in [1, {MAX_HISTORY}], got {tuple(history.shape)} {history.dtype}")
    B = x_t.shape[0]
    D = x_t[0].numel() if B else 0
    if rng is not None and D >= 2**32:
        raise ValueError(f"sample_step: in-kernel noise needs fewer than 2^32 elements per sample, got {D}")
    xc, ec = x_t.contiguous(), eps.contiguous()
    nz = noise.to(x_t.dtype).contiguous() if noise is not None else xc
    y = _empty(x_t.shape, x_t.dtype, x_t.device)
    x0 = _empty(x_t.shape if write_x0 else (0,), x_t.dtype, x_t.device)
    if B == 0 or D == 0:
        return y, x0
    tab = table.contiguous()
    _batched_launch(_sample_step_fwd_kernel, B, D,
                    lambda b0: (xc, ec, history if history is not None else xc, nz, tab, step,
                                rng if rng is not None else step, y, x0 if write_x0 else y, D, B * D,
                                tab.shape[0], b0),
                    CLIP=bool(clip), HIST=0 if history is None else history.shape[0] - 1,
                    NOISE=1 if noise is not None else 2 if rng is not None else 0, WRITE_X0=bool(write_x0))
    return y, x0
