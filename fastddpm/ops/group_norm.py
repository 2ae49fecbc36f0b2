"""ops.group_norm: GroupNorm with optional fused SiLU.

Backends: "reference" (fastddpm.reference.group_norm_ref) and "triton": the
custom ops torch.ops.fastddpm.group_norm (forward, returns (y, mean, rstd)) and
torch.ops.fastddpm.group_norm_backward, with a fake implementation each and
autograd linking them, so the Triton path works under torch.compile, inside
CUDA graphs and through torch.library.opcheck. The Triton kernels are imported
on first use, so `import fastddpm.ops` does not import triton.
"""
from typing import Optional

import torch

from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float

ACTS = (None, "silu")
# dtypes the Triton kernels take; anything else runs the reference.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, num_groups, weight, bias, eps, act):
    check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"group_norm: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups != 0:
        raise ValueError(f"group_norm: channels {C} are not divisible by num_groups {num_groups}")
    if act not in ACTS:
        raise ValueError(f"group_norm: act must be one of {ACTS}, got {act!r}")
    if not eps > 0:
        raise ValueError(f"group_norm: eps must be > 0, got {eps}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_float(name, p)
        if p.shape != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},), got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device}, x on {x.device}")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, act=None):
    """GroupNorm(num_groups) of x (N, C, *spatial), affine if weight/bias given,
    followed by SiLU when act == "silu". Statistics in fp32; output in x.dtype."""
    _check(x, num_groups, weight, bias, eps, act)
    return _backend.pick("group_norm", x.device)(x, num_groups, weight, bias, eps, act)


# ----------------------------------------------------------------------------- triton custom ops


def _kernels():
    from fastddpm.kernels import group_norm as k
    return k


@torch.library.custom_op("fastddpm::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], eps: float, act: Optional[str]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GroupNorm(+SiLU) forward: (y, mean, rstd), mean/rstd (N, G) fp32."""
    return _kernels().group_norm_fwd(x, num_groups, weight, bias, eps, act)


@group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, act):
    torch._check(x.dim() >= 2, lambda: f"group_norm: x must be (N, C, *spatial), got {x.dim()}-D")
    torch._check(x.shape[1] % num_groups == 0, lambda: "group_norm: C not divisible by num_groups")
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _kernels().empty_output_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastddpm::group_norm_backward", mutates_args=())
def group_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                           num_groups: int, act: Optional[str], dbias_dtype: Optional[torch.dtype]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GroupNorm(+SiLU) backward: (dx, dweight, dbias). bias is needed only
    to recompute SiLU; dbias is computed when dbias_dtype is given. A gradient
    not computed comes back as an empty (0,) tensor (custom ops cannot return None)."""
    dx, dw, db = _kernels().group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, act,
                                           dbias_dtype=dbias_dtype)
    return dx, x.new_empty((0,)) if dw is None else dw, x.new_empty((0,)) if db is None else db


@group_norm_backward_op.register_fake
def _group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, act, dbias_dtype):
    torch._check(dy.shape == x.shape, lambda: "group_norm_backward: dy and x shapes differ")
    dw = x.new_empty((0,)) if weight is None else weight.new_empty(weight.shape)
    db = x.new_empty((0,)) if dbias_dtype is None else x.new_empty((x.shape[1],), dtype=dbias_dtype)
    return _kernels().empty_output_like(x), dw, db


def _group_norm_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, act = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # the backward reads bias only to recompute SiLU; for dbias it needs just its dtype
    ctx.save_for_backward(x, weight, bias if act == "silu" else None, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act
    ctx.dbias_dtype = None if bias is None else bias.dtype


def _group_norm_autograd(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastddpm.group_norm_backward(
        dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act, ctx.dbias_dtype)
    return (dx, None, dw if weight is not None else None,
            db if ctx.dbias_dtype is not None else None, None, None)


group_norm_op.register_autograd(_group_norm_autograd, setup_context=_group_norm_setup_context)


def _group_norm_triton(x, num_groups, weight=None, bias=None, eps=1e-6, act=None):
    """The "triton" implementation; what the kernels do not take runs the reference."""
    if x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return reference.group_norm_ref(x, num_groups, weight, bias, eps, act)
    return torch.ops.fastddpm.group_norm(x, num_groups, weight, bias, float(eps), act)[0]


_backend.register("group_norm", "reference", reference.group_norm_ref)
_backend.register("group_norm", "triton", _group_norm_triton)
