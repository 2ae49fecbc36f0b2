"""ops.conv1x1: a 1x1 convolution with the AttentionBlock's neighbours fused in:
an optional GroupNorm of the input applied on load (the "prologue": the
normalised tensor never reaches memory) and an optional residual added before
the store. The fusion ablation of issue 5: norm + q/k/v projection and
output projection + residual each in one pass.

    out = conv1x1(GroupNorm(x) if norm else x, weight, bias) (+ residual)

Backends: "reference" (fastddpm.reference.conv1x1_ref) and "triton": the custom
ops below around kernels.conv1x1 (the GEMM) and kernels.group_norm (the
statistics, folded to a per-(sample, channel) scale and shift in the same
pass). The triton backend runs the reference for what the kernels do not take:
float64, empty tensors, and fp16/bf16 weights on the CPU interpreter.

Dtypes: the products run in weight's dtype (x, normalised in fp32 when norm is
given, is rounded to it); the output has weight's dtype, promoted with the
residual's. Under autocast, weight and bias are cast to the autocast dtype, and
so is x unless it is normalised first (GroupNorm runs on x as given, as
autocast runs group_norm in fp32): what GroupNorm -> autocast conv -> + residual
computes unfused.

Custom ops (schema namespace fastddpm):
  fastddpm::conv1x1(Tensor x, Tensor weight, Tensor? bias, Tensor? residual,
                    int num_groups, Tensor? gn_weight, Tensor? gn_bias, float eps)
                    -> (Tensor out, Tensor mean, Tensor rstd)
      x (N, K, *spatial); weight (M, K) or (M, K, 1, 1); bias (M,); residual
      (N, M, *spatial). num_groups > 0 turns the GroupNorm prologue on
      (gn_weight/gn_bias (K,) or None, eps); 0 turns it off. out (N, M,
      *spatial) in the layout kernels.conv1x1.new_output gives (channel-fastest
      when x is, else contiguous); mean/rstd: the GroupNorm statistics (N, G)
      fp32, or empty (0,) tensors without the prologue; not differentiable.
      Autograd registered: saves x, weight, mean, rstd, gn_weight, gn_bias
      (never the normalised x: the backward recomputes it).
  fastddpm::conv1x1_backward(Tensor dout, Tensor x, Tensor weight, Tensor mean,
                             Tensor rstd, int num_groups, Tensor? gn_weight,
                             Tensor? gn_bias, ScalarType? dbias_dtype)
                             -> (Tensor dp, Tensor dweight, Tensor dbias)
      dp: the gradient of the conv's input P(x) (= dx without the prologue),
      x's shape, dtype and layout family; dweight: weight's shape and dtype;
      dbias: (M,) in dbias_dtype, or an empty (0,) tensor when it is None.
      torch matmuls in weight's dtype (fp32 accumulation). With the prologue,
      autograd then runs fastddpm::group_norm_backward on dp for dx,
      d gn_weight and d gn_bias; d residual is dout itself.
"""
import math
from typing import Optional

import torch

from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float
from fastddpm.ops.group_norm import _check as _check_group_norm

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, weight, bias, norm, residual):
    check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"conv1x1: x must be (N, K, *spatial), got shape {tuple(x.shape)}")
    check_float("weight", weight)
    if weight.device != x.device:
        raise ValueError(f"conv1x1: weight is on {weight.device}, x on {x.device}")
    K = x.shape[1]
    if weight.dim() not in (2, 4) or weight.shape[1] != K or tuple(weight.shape[2:]) not in ((), (1, 1)):
        raise ValueError(f"conv1x1: weight must be (M, {K}) or (M, {K}, 1, 1) for x with {K} channels, "
                         f"got {tuple(weight.shape)}")
    M = weight.shape[0]
    out_shape = (x.shape[0], M, *x.shape[2:])
    for name, t, shape in (("bias", bias, (M,)), ("residual", residual, out_shape)):
        if t is None:
            continue
        check_float(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"conv1x1: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"conv1x1: {name} is on {t.device}, x on {x.device}")
    if norm is not None:
        if not isinstance(norm, (tuple, list)) or len(norm) != 4:
            raise TypeError("conv1x1: norm must be None or a tuple (num_groups, gn_weight, gn_bias, eps)")
        num_groups, gn_weight, gn_bias, eps = norm
        if isinstance(num_groups, bool):
            raise ValueError(f"conv1x1: norm's num_groups must be a positive int, got {num_groups!r}")
        _check_group_norm(x, num_groups, gn_weight, gn_bias, eps, None)


def conv1x1(x, weight, bias=None, *, norm=None, residual=None):
    """1x1 convolution: out[n, m] = sum_k weight[m, k] P(x)[n, k] + bias[m] (+ residual[n, m]).

    x: (N, K, *spatial) (any number of spatial dims, e.g. (N, K, H, W) or
    (N, K, L)); weight: (M, K) or (M, K, 1, 1); bias: (M,) or None.
    norm: None (P(x) = x) or (num_groups, gn_weight, gn_bias, eps): P(x) =
    GroupNorm(x) without activation, gn_weight/gn_bias (K,) or None.
    residual: None or a tensor of the output's shape (N, M, *spatial), added.
    Returns (N, M, *spatial) in weight's dtype promoted with residual's (see the
    module docstring for autocast)."""
    _check(x, weight, bias, norm, residual)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if norm is None:
            x = x.to(dtype)
    weight = weight.reshape(weight.shape[0], x.shape[1])
    return _backend.call("conv1x1", x.device, x, weight, bias, norm, residual)


# ----------------------------------------------------------------------------- triton custom ops


def _kernels():
    from fastddpm.kernels import conv1x1 as k
    return k


def _group_norm_kernels():
    from fastddpm.kernels import group_norm as k
    return k


def _flat(t, channels):
    """(N, C, *spatial) -> (N, C, L): a view when the spatial dims collapse, else a copy."""
    return t.reshape(t.shape[0], channels, math.prod(t.shape[2:]))


@torch.library.custom_op("fastddpm::conv1x1", mutates_args=())
def conv1x1_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], num_groups: int, gn_weight: Optional[torch.Tensor],
               gn_bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton 1x1 conv (+ GroupNorm prologue when num_groups > 0)(+ residual): (out, mean, rstd)."""
    k = _kernels()
    N, K, M, L = x.shape[0], x.shape[1], weight.shape[0], math.prod(x.shape[2:])
    out = k.new_output(x, M, k.output_dtype(weight.dtype, residual))
    scale = shift = None
    if num_groups > 0:
        scale, shift, mean, rstd = _group_norm_kernels().group_norm_scale_shift(x, num_groups, gn_weight,
                                                                                gn_bias, eps)
    else:
        mean, rstd = x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
    k.conv1x1_fwd(_flat(x, K), weight, bias, scale=scale, shift=shift,
                  residual=None if residual is None else _flat(residual, M), out=out.view(N, M, L))
    return out, mean, rstd


@conv1x1_op.register_fake
def _conv1x1_fake(x, weight, bias, residual, num_groups, gn_weight, gn_bias, eps):
    torch._check(x.dim() >= 2, lambda: f"conv1x1: x must be (N, K, *spatial), got {x.dim()}-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "conv1x1: weight's K differs from x's channels")
    k = _kernels()
    out = k.new_output(x, weight.shape[0], k.output_dtype(weight.dtype, residual))
    if num_groups > 0:
        torch._check(x.shape[1] % num_groups == 0, lambda: "conv1x1: channels not divisible by num_groups")
        mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    else:
        mean = x.new_empty((0,), dtype=torch.float32)
    return out, mean, torch.empty_like(mean)


def _compute_dtype(weight):
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


def _scale_shift(mean, rstd, gn_weight, gn_bias, channels):
    """The GroupNorm folded to (N, K) fp32 scale and shift (as group_norm_scale_shift writes them)."""
    per_group = channels // mean.shape[1]
    scale = rstd.repeat_interleave(per_group, dim=1)
    if gn_weight is not None:
        scale = scale * gn_weight.float()
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if gn_bias is not None:
        shift = shift + gn_bias.float()
    return scale, shift


@torch.library.custom_op("fastddpm::conv1x1_backward", mutates_args=())
def conv1x1_backward_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, num_groups: int, gn_weight: Optional[torch.Tensor],
                        gn_bias: Optional[torch.Tensor], dbias_dtype: Optional[torch.dtype]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of fastddpm::conv1x1 wrt the conv's input P(x), weight and bias:
    (dp, dweight, dbias); P(x) is recomputed from mean/rstd, never saved."""
    N, K, M = x.shape[0], x.shape[1], weight.shape[0]
    cd = _compute_dtype(weight)
    with torch.autocast(x.device.type, enabled=False):
        d = _flat(dout, M).to(cd)
        p = _flat(x, K)
        if num_groups > 0:
            scale, shift = _scale_shift(mean, rstd, gn_weight, gn_bias, K)
            p = p.float() * scale[:, :, None] + shift[:, :, None]
        w = weight.reshape(M, K).to(cd)
        dweight = torch.einsum("nml,nkl->mk", d, p.to(cd)).to(weight.dtype).reshape(weight.shape)
        if _kernels().channels_fastest(x):   # (N, L, K) memory, as new_output lays it out
            dp = torch.matmul(d.transpose(1, 2), w).transpose(1, 2)
        else:
            dp = torch.matmul(w.t(), d)
        dp = dp.to(x.dtype).reshape(x.shape)
        dbias = x.new_empty((0,)) if dbias_dtype is None else d.float().sum((0, 2)).to(dbias_dtype)
    return dp, dweight, dbias


@conv1x1_backward_op.register_fake
def _conv1x1_backward_fake(dout, x, weight, mean, rstd, num_groups, gn_weight, gn_bias, dbias_dtype):
    torch._check(dout.shape[0] == x.shape[0] and dout.shape[1] == weight.shape[0],
                 lambda: "conv1x1_backward: dout must be (N, M, *spatial)")
    dp = _kernels().new_output(x, x.shape[1], x.dtype)
    dbias = x.new_empty((0,)) if dbias_dtype is None else x.new_empty((weight.shape[0],), dtype=dbias_dtype)
    return dp, weight.new_empty(weight.shape), dbias


def _conv1x1_setup_context(ctx, inputs, output):
    x, weight, bias, residual, num_groups, gn_weight, gn_bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd, gn_weight, gn_bias)
    ctx.num_groups = num_groups
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _conv1x1_autograd(ctx, dout, _dmean, _drstd):
    x, weight, mean, rstd, gn_weight, gn_bias = ctx.saved_tensors
    G = ctx.num_groups
    dx, dweight, dbias = torch.ops.fastddpm.conv1x1_backward(dout, x, weight, mean, rstd, G, gn_weight, gn_bias,
                                                             ctx.bias_dtype)
    dgw = dgb = None
    if G > 0:
        dx, dgw, dgb, _ = torch.ops.fastddpm.group_norm_backward(
            dx, x, gn_weight, None, mean, rstd, G, None, None if gn_bias is None else gn_bias.dtype,
            None, None, 0.0)
    dres = None if ctx.residual_dtype is None else dout.to(ctx.residual_dtype)
    return (dx, dweight, None if ctx.bias_dtype is None else dbias, dres, None,
            None if gn_weight is None else dgw, None if gn_bias is None else dgb, None)


conv1x1_op.register_autograd(_conv1x1_autograd, setup_context=_conv1x1_setup_context)


def _kernel_can_run(x, weight, bias, norm, residual):
    """Whether the Triton kernels take these inputs (metadata only, no host sync)."""
    tensors = [x, weight, bias, residual] + ([] if norm is None else [norm[1], norm[2]])
    if any(t is not None and t.dtype not in _KERNEL_DTYPES for t in tensors):
        return False
    if x.numel() == 0 or weight.numel() == 0:
        return False
    if x.device.type == "cpu":   # the interpreter (the backend checked it is on): no bfloat16 tl.dot
        return weight.dtype != torch.bfloat16
    return x.device.type == "cuda"


def _conv1x1_triton(x, weight, bias=None, norm=None, residual=None):
    """The "triton" implementation; what the kernels do not take runs the reference."""
    if not _kernel_can_run(x, weight, bias, norm, residual):
        return reference.conv1x1_ref(x, weight, bias, norm, residual)
    num_groups, gn_weight, gn_bias, eps = norm if norm is not None else (0, None, None, 0.0)
    return torch.ops.fastddpm.conv1x1(x, weight, bias, residual, num_groups, gn_weight, gn_bias, float(eps))[0]


_backend.register("conv1x1", "reference", reference.conv1x1_ref)
_backend.register("conv1x1", "triton", _conv1x1_triton)
