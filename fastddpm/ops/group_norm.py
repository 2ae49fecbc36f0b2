"""ops.group_norm: GroupNorm with optional fused SiLU, and the two neighbours
the UNet's ResBlock puts around its second GroupNorm: a per-(sample, channel)
term added before it (`add`, the timestep embedding) and dropout after it.

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
from fastddpm.ops import _backend, _replay
from fastddpm.ops._checks import check_float

ACTS = (None, "silu")
# dtypes the Triton kernels take; anything else runs the reference.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, num_groups, weight, bias, eps, act, add=None, dropout=0.0):
    check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"group_norm: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    C = x.shape[1]
    # bool is an int to Python, but GroupNorm(True) is a caller's mistake: refuse it on every backend
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
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
    if add is not None:
        check_float("add", add)
        if add.shape != x.shape[:2]:
            raise ValueError(f"group_norm: add must have shape (N, C) = {tuple(x.shape[:2])}, "
                             f"got {tuple(add.shape)}")
        if add.device != x.device:
            raise ValueError(f"group_norm: add is on {add.device}, x on {x.device}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"group_norm: dropout must be a float in [0, 1), got {dropout!r}")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, *, add=None, dropout=0.0):
    """GroupNorm(num_groups) of x (N, C, *spatial), affine if weight/bias given,
    followed by SiLU when act == "silu". Statistics in fp32; output in x.dtype.

    add: optional (N, C) tensor added to x (broadcast over the spatial dims)
    before the normalisation, fused into the load. dropout: probability of
    dropout applied to the output, as in training (pass 0 in eval). The triton
    backend draws the mask inside the kernel by Philox from a seed that torch's
    generator of x's device supplies (torch.manual_seed makes it repeatable) and
    regenerates it in the backward; the reference uses F.dropout. So only the
    random stream differs between backends, never the math."""
    _check(x, num_groups, weight, bias, eps, act, add, dropout)
    return _backend.call("group_norm", x.device, x, num_groups, weight, bias, eps, act, add, float(dropout))


# ----------------------------------------------------------------------------- triton custom ops


def _kernels():
    from fastddpm.kernels import group_norm as k
    return k


@torch.library.custom_op("fastddpm::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], eps: float, act: Optional[str],
                  add: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None, p: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GroupNorm(+SiLU)(+dropout) forward of x + add: (y, mean, rstd),
    mean/rstd (N, G) fp32. Dropout (p > 0) uses the Philox mask of `seed`."""
    return _kernels().group_norm_fwd(x, num_groups, weight, bias, eps, act, add=add, seed=seed, p=p)


@group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, act, add=None, seed=None, p=0.0):
    torch._check(x.dim() >= 2, lambda: f"group_norm: x must be (N, C, *spatial), got {x.dim()}-D")
    torch._check(x.shape[1] % num_groups == 0, lambda: "group_norm: C not divisible by num_groups")
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _kernels().empty_output_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastddpm::group_norm_backward", mutates_args=())
def group_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                           num_groups: int, act: Optional[str], dbias_dtype: Optional[torch.dtype],
                           add: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                           p: float = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GroupNorm(+SiLU)(+dropout) backward: (dx, dweight, dbias, dadd).
    bias is needed only to recompute SiLU; dbias is computed when dbias_dtype is
    given. A gradient not computed comes back as an empty (0,) tensor (custom ops
    cannot return None)."""
    dx, dw, db, da = _kernels().group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, act,
                                               add=add, seed=seed, p=p, dbias_dtype=dbias_dtype)
    def given(g):  # one fresh (0,) tensor per missing gradient: outputs must not alias
        return x.new_empty((0,)) if g is None else g
    return dx, given(dw), given(db), given(da)


@group_norm_backward_op.register_fake
def _group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, act, dbias_dtype,
                              add=None, seed=None, p=0.0):
    torch._check(dy.shape == x.shape, lambda: "group_norm_backward: dy and x shapes differ")
    dw = x.new_empty((0,)) if weight is None else weight.new_empty(weight.shape)
    db = x.new_empty((0,)) if dbias_dtype is None else x.new_empty((x.shape[1],), dtype=dbias_dtype)
    da = x.new_empty((0,)) if add is None else add.new_empty(add.shape)
    return _kernels().empty_output_like(x), dw, db, da


def _group_norm_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, act, add, seed, p = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # the backward reads bias only to recompute SiLU; for dbias it needs just its dtype
    ctx.save_for_backward(x, weight, bias if act == "silu" else None, mean, rstd, add, seed)
    ctx.num_groups, ctx.act, ctx.p = num_groups, act, p
    ctx.dbias_dtype = None if bias is None else bias.dtype


def _group_norm_autograd(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd, add, seed = ctx.saved_tensors
    dx, dw, db, da = torch.ops.fastddpm.group_norm_backward(
        dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act, ctx.dbias_dtype, add, seed, ctx.p)
    return (dx, None, dw if weight is not None else None,
            db if ctx.dbias_dtype is not None else None, None, None,
            da if add is not None else None, None, None)


group_norm_op.register_autograd(_group_norm_autograd, setup_context=_group_norm_setup_context)


def _group_norm_triton(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None, dropout=0.0):
    """The "triton" implementation; what the kernels do not take runs the reference."""
    if (x.dtype not in _KERNEL_DTYPES or x.numel() == 0
            or (add is not None and add.dtype not in _KERNEL_DTYPES)):
        return reference.group_norm_ref(x, num_groups, weight, bias, eps, act, add, dropout)
    seed = _kernels().new_seed(x.device) if dropout > 0 else None
    return torch.ops.fastddpm.group_norm(x, num_groups, weight, bias, float(eps), act, add, seed,
                                         float(dropout))[0]


_backend.register("group_norm", "reference", reference.group_norm_ref)
_backend.register("group_norm", "triton", _group_norm_triton, replay=_replay.group_norm_triton)

# the "cpp" backend of every op (C++ kernels of fastddpm._C) registers itself
from fastddpm.ops import _cpp  # noqa: E402,F401
