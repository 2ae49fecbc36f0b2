"""1x1 convolution as a per-sample GEMM, with an optional GroupNorm prologue
and an optional residual epilogue: the Triton kernel and its thin launcher.

Per sample n (X: (N, K, L), W: (M, K), Out: (N, M, L)):

    Out[n, m, l] = sum_k W[m, k] * P(X[n, k, l]) + bias[m]  (+ R[n, m, l])

with P(x) = x * Scale[n, k] + Shift[n, k] when a prologue is given, else
P(x) = x. Scale and Shift are a GroupNorm folded into a per-(sample, channel)
affine (scale = rstd[n, g(k)] * gn_weight[k], shift = gn_bias[k] - mean[n, g(k)]
* scale; kernels.group_norm.group_norm_scale_shift computes them in the pass
that gathers the statistics), so the normalised tensor never reaches memory;
the residual is added before the one store, so `x + proj(h)` is one pass too.

Layout: X, R and Out are (N, channels, L) with explicit strides, so contiguous
(B, C, H*W) tensors and channels_last ones (channel stride 1) are both read in
place. A new Out is channel-major (contiguous) unless X is channel-fastest
(channels_last and its (N, L, K)-memory analogue), then channel-fastest too
(`new_output`; the ops layer's fake implementation allocates the same).

Precision: the products run in W's dtype: fp16/bf16 W puts tl.dot on the
tensor cores (X, after the prologue in fp32, is rounded to W's dtype), fp32 W
uses input_precision="ieee" (exact fp32 products, within ~1e-7 of float64) unless
the launcher is asked for "tf32". Accumulation, bias and residual in fp32;
the output dtype is W's, promoted with the residual's when there is one (what
`residual + conv(x)` gives in PyTorch). The folded prologue x * scale + shift
cancels two terms of size ~|x| * rstd where GroupNorm's (x - mean) * rstd
subtracts first: the same ~|mean| / std * 2^-24 relative error for ordinary
groups (what fp32 statistics cost anyway), but in a zero-variance group (one
element, or constant) rstd = 1/sqrt(eps) and the absolute error grows to
~|x| * 2^-24 / sqrt(eps). Irrelevant with bf16 operands (rounded to 2^-8).

Tiles: one program per (BLOCK_M x BLOCK_L) output tile of one sample, looping
over K in BLOCK_K steps; the grid is 1-D (N * tiles_L * tiles_M programs, the
M tile fastest so the programs sharing an X tile run together), which keeps
clear of the 65535 limit of grid axes 1 and 2 at any batch. X_LEFT picks the
orientation of the product: False computes the (M, L) tile as W @ P(X), True
the (L, M) tile as P(X)^T @ W^T, which puts the prologue's operand (modified in
registers) on the left, where sm_90's wgmma can read it from registers
(the right operand must come from shared memory). Autotuned on the GPU over a
few tiles of both orientations (key: M, K, L, the layouts and the fusions);
one small config under TRITON_INTERPRET=1 (the CPU tests); `config=` in the
launcher bypasses the autotuner (tests use it to run both orientations).
Autotuning benchmarks on the first call of a new key: warm up before
capturing a CUDA graph.

No autograd and no dispatch here: fastddpm.ops.conv1x1 wraps the launcher in
the custom op fastddpm::conv1x1. Test hook: POISON = True NaN-fills every
buffer the launcher allocates.
"""
import math

import torch
import triton
import triton.language as tl

from fastddpm.kernels._util import interpreting, overlaps
from fastddpm.kernels.group_norm import spatial_stride

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Test hook: when True, every buffer the launcher allocates is filled with NaN
# first, so that an element the kernel does not write shows up.
POISON = False

# (BLOCK_M, BLOCK_L, BLOCK_K, num_warps, num_stages, X_LEFT) tried on the GPU.
# With X_LEFT, BLOCK_L is the M dimension of the MMA (>= 64 for wgmma).
_GPU_TILES = [
    (128, 128, 64, 8, 3, False), (128, 128, 32, 4, 4, False), (128, 64, 64, 4, 3, False),
    (64, 128, 64, 4, 4, False), (64, 64, 64, 4, 4, False),
    (128, 128, 64, 8, 3, True), (128, 128, 32, 4, 4, True), (128, 64, 64, 4, 3, True),
    (64, 128, 64, 4, 4, True), (64, 64, 64, 4, 4, True),
]
# Under the interpreter: small tiles, so that the CPU tests' sizes span several
# M, L and K blocks and every mask is exercised.
_INTERPRET_TILE = (16, 16, 8, 4, 1, True)


def _config(tile):
    bm, bl, bk, warps, stages, x_left = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_L": bl, "BLOCK_K": bk, "X_LEFT": x_left},
                         num_warps=warps, num_stages=stages)


def _configs():
    return [_config(_INTERPRET_TILE)] if interpreting() else [_config(t) for t in _GPU_TILES]


def _prune_configs(configs, nargs, **kwargs):
    """early_config_prune: under input_precision="ieee" (fp32 products on the FMA
    units) the X_LEFT=False tiles spill 8-22 KB per thread on sm_90, so only the
    X_LEFT=True ones are benchmarked. Never empty."""
    if kwargs.get("DOT_PRECISION", nargs.get("DOT_PRECISION")) == "ieee":
        return [c for c in configs if c.kwargs["X_LEFT"]] or configs
    return configs


# Autotune key: what changes the compiled code besides the dtypes (added by the
# autotuner): sizes, layouts, fusions and the dot precision.
_KEY = ["M", "K", "L", "stride_xl", "stride_ol", "HAS_BIAS", "HAS_PROLOGUE", "HAS_RESIDUAL", "DOT_PRECISION"]


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune_configs},
                 cache_results=True)
@triton.jit
def _conv1x1_fwd_kernel(
    X,          # (N, K, L) input, fp16/bf16/fp32, strides (stride_xn, stride_xk, stride_xl)
    W,          # (M, K) weight, fp16/bf16/fp32 (the product's dtype), strides (stride_wm, stride_wk)
    Bias,       # (M,) any float dtype, contiguous; unused unless HAS_BIAS
    Scale,      # (N, K) fp32, contiguous: the prologue's per-(sample, channel) scale; unused unless HAS_PROLOGUE
    Shift,      # (N, K) fp32, contiguous: the prologue's shift; unused unless HAS_PROLOGUE
    R,          # (N, M, L) residual, any float dtype, strides stride_r*; unused unless HAS_RESIDUAL
    Out,        # (N, M, L) output, strides (stride_on, stride_om, stride_ol)
    M,          # output channels
    K,          # input channels
    L,          # positions per sample (H * W)
    stride_xn,  # elements between samples of X
    stride_xk,  # elements between channels of X
    stride_xl,  # elements between positions of X
    stride_wm,  # elements between rows (output channels) of W
    stride_wk,  # elements between columns (input channels) of W
    stride_rn,  # elements between samples of R
    stride_rm,  # elements between channels of R
    stride_rl,  # elements between positions of R
    stride_on,  # elements between samples of Out
    stride_om,  # elements between channels of Out
    stride_ol,  # elements between positions of Out
    HAS_BIAS: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" | "tf32" (fp32 W only)
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
    X_LEFT: tl.constexpr,          # tile (BLOCK_L, BLOCK_M) = P(X)^T W^T instead of (BLOCK_M, BLOCK_L) = W P(X)
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_l = tl.cdiv(L, BLOCK_L)
    pid_m = pid % tiles_m
    pid_l = (pid // tiles_m) % tiles_l
    n = (pid // tiles_m // tiles_l).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rl = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    rk = tl.arange(0, BLOCK_K)
    # index grids of the accumulator tile and of the operands, per orientation
    if X_LEFT:
        om, ol = rm[None, :], rl[:, None]               # acc (BLOCK_L, BLOCK_M)
        xk, xl = rk[None, :], rl[:, None]               # X^T tile (BLOCK_L, BLOCK_K)
        wm, wk = rm[None, :], rk[:, None]               # W^T tile (BLOCK_K, BLOCK_M)
        acc = tl.zeros((BLOCK_L, BLOCK_M), dtype=tl.float32)
    else:
        om, ol = rm[:, None], rl[None, :]               # acc (BLOCK_M, BLOCK_L)
        xk, xl = rk[:, None], rl[None, :]               # X tile (BLOCK_K, BLOCK_L)
        wm, wk = rm[:, None], rk[None, :]               # W tile (BLOCK_M, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    # per-sample base pointers (int64 sample offsets); offsets inside a sample stay int32
    x_ptrs = X + n * stride_xn + xk * stride_xk + xl * stride_xl
    w_ptrs = W + wm * stride_wm + wk * stride_wk
    scale_base = Scale + n * K
    shift_base = Shift + n * K
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=(xk < K - k0) & (xl < L), other=0.0)
        if HAS_PROLOGUE:
            # masked channels get scale = shift = 0, so P = 0 there (and W is 0 there too)
            scale = tl.load(scale_base + k0 + xk, mask=xk < K - k0, other=0.0)
            shift = tl.load(shift_base + k0 + xk, mask=xk < K - k0, other=0.0)
            x = x.to(tl.float32) * scale + shift
        w = tl.load(w_ptrs, mask=(wm < M) & (wk < K - k0), other=0.0)
        x = x.to(W.dtype.element_ty)
        if X_LEFT:
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    mask = (om < M) & (ol < L)
    if HAS_BIAS:
        acc += tl.load(Bias + om, mask=om < M, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_base = R + n * stride_rn
        acc += tl.load(r_base + om * stride_rm + ol * stride_rl, mask=mask, other=0.0).to(tl.float32)
    out_base = Out + n * stride_on
    tl.store(out_base + om * stride_om + ol * stride_ol, acc.to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- layouts and buffers


def output_dtype(weight_dtype, residual=None):
    """The output dtype: W's, promoted with the residual's when there is one."""
    return weight_dtype if residual is None else torch.promote_types(weight_dtype, residual.dtype)


def channels_fastest(x):
    """True when x (N, C, *spatial) keeps its channels innermost with one stride
    over the positions (channels_last, or a transposed (N, L, C) buffer)."""
    if x.dim() < 3 or x.shape[1] <= 1 or math.prod(x.shape[2:]) <= 1 or x.stride(1) != 1:
        return False
    st = spatial_stride(x)
    return st is not None and st > 1


def new_output(x, channels, dtype):
    """An uninitialised (N, channels, *spatial) tensor for x (N, K, *spatial):
    channel-fastest (x.shape[0], *spatial, channels memory) when x is (see
    channels_fastest), else contiguous. NaN-filled under POISON. The fake
    implementations allocate through this too, so real and fake strides agree."""
    N, spatial = x.shape[0], tuple(x.shape[2:])
    if channels_fastest(x):
        out = torch.empty((N, *spatial, channels), dtype=dtype, device=x.device).movedim(-1, 1)
    else:
        out = torch.empty((N, channels, *spatial), dtype=dtype, device=x.device)
    return out.fill_(float("nan")) if POISON else out


# ----------------------------------------------------------------------------- launcher


def _check_tensor(name, t, shape, device, dtypes):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"conv1x1 kernel: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"conv1x1 kernel: {name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"conv1x1 kernel: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"conv1x1 kernel: {name} is on {t.device}, x on {device}")


def _span(t):
    """Elements one sample of a (N, C, L) tensor spans (offsets inside a sample are int32)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:])) + 1


def _check_launch(x, weight, bias, scale, shift, residual):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("conv1x1 kernel: x and weight must be torch.Tensors")
    if x.dim() != 3:
        raise ValueError(f"conv1x1 kernel: x must be (N, K, L), got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"conv1x1 kernel: x must be float16, bfloat16 or float32, got {x.dtype}")
    N, K, L = x.shape
    if weight.dim() not in (2, 4) or (weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)):
        raise ValueError(f"conv1x1 kernel: weight must be (M, K) or (M, K, 1, 1), got {tuple(weight.shape)}")
    M = weight.shape[0]
    _check_tensor("weight", weight, (M, K, *weight.shape[2:]), x.device, KERNEL_DTYPES)
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"conv1x1 kernel: device {x.device} is not supported")
    if x.device.type == "cpu":
        if not interpreting():
            raise ValueError("conv1x1 kernel: CPU tensors need TRITON_INTERPRET=1")
        if weight.dtype == torch.bfloat16:
            raise TypeError("conv1x1 kernel: the Triton interpreter cannot multiply bfloat16 (tl.dot); "
                            "weight is bfloat16")
    if bias is not None:
        _check_tensor("bias", bias, (M,), x.device, KERNEL_DTYPES)
    if (scale is None) != (shift is None):
        raise ValueError("conv1x1 kernel: scale and shift come together (the folded GroupNorm) or not at all")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            _check_tensor(name, t, (N, K), x.device, (torch.float32,))
            if not t.is_contiguous():
                raise ValueError(f"conv1x1 kernel: {name} must be contiguous")
    if residual is not None:
        _check_tensor("residual", residual, (N, M, L), x.device, KERNEL_DTYPES)


def conv1x1_fwd(x, weight, bias=None, *, scale=None, shift=None, residual=None, out=None,
                input_precision=None, config=None):
    """Out[n] = W @ P(x[n]) + bias (+ residual[n]) for x (N, K, L), any strides.

    weight: (M, K) or (M, K, 1, 1), fp16/bf16/fp32 (the dtype of the products;
    fp32 only under the interpreter); bias: (M,) or None; scale, shift: (N, K)
    fp32 contiguous, both or neither (P(x) = x * scale + shift, else P(x) = x);
    residual: (N, M, L) or None, any strides. out: optional (N, M, L) buffer
    of the output dtype (W's, promoted with residual's), any strides; a new one
    follows x's layout (new_output). input_precision: "ieee" (default for fp32)
    or "tf32". config: {BLOCK_M, BLOCK_L, BLOCK_K, X_LEFT, num_warps?,
    num_stages?} to run instead of the autotuned choice. Returns out.
    `out` must not overlap any input: autotuning runs the kernel several times.
    """
    _check_launch(x, weight, bias, scale, shift, residual)
    precision = input_precision or ("ieee" if weight.dtype == torch.float32 else "tf32")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"conv1x1 kernel: input_precision must be 'ieee' or 'tf32', got {input_precision!r}")
    N, K, L = x.shape
    M = weight.shape[0]
    dtype = output_dtype(weight.dtype, residual)
    if out is None:
        out = new_output(x, M, dtype)
    else:
        _check_tensor("out", out, (N, M, L), x.device, (dtype,))
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift),
                        ("residual", residual)):
            if t is not None and overlaps(out, t):
                raise ValueError(f"conv1x1 kernel: out must not share memory with {name}")
    if out.numel() == 0:
        return out
    w = weight.reshape(M, K)
    if max(_span(x), _span(out), 0 if residual is None else _span(residual)) >= 2**31 \
            or M * K >= 2**31 or N * K >= 2**31:
        raise ValueError(f"conv1x1 kernel: one sample spans >= 2^31 elements (x {tuple(x.shape)}, M {M})")
    rs = residual.stride() if residual is not None else (0, 0, 0)
    args = (x, w, bias.contiguous() if bias is not None else w, scale if scale is not None else w,
            shift if shift is not None else w, residual if residual is not None else out, out,
            M, K, L, *x.stride(), *w.stride(), *rs, *out.stride())
    flags = dict(HAS_BIAS=bias is not None, HAS_PROLOGUE=scale is not None, HAS_RESIDUAL=residual is not None,
                 DOT_PRECISION=precision)
    if config is None:
        def grid(meta):
            return (N * triton.cdiv(L, meta["BLOCK_L"]) * triton.cdiv(M, meta["BLOCK_M"]),)
        _conv1x1_fwd_kernel[grid](*args, **flags)
    else:
        meta = dict(config)
        grid = (N * triton.cdiv(L, meta["BLOCK_L"]) * triton.cdiv(M, meta["BLOCK_M"]),)
        _conv1x1_fwd_kernel.fn[grid](*args, **flags, **meta)
    return out
