"""ops.group_norm: GroupNorm with optional fused SiLU."""
import torch

from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float

ACTS = (None, "silu")


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


_backend.register("group_norm", "reference", reference.group_norm_ref)
