"""Plain-PyTorch reference for every fused op: the specification.

Every fast path (Triton, C++) is tested against these functions. They compute
in float32 (float64 when given float64) and return the input dtype, which is
the contract the fused kernels keep: fp32 statistics and accumulation, I/O in
the caller's dtype. No input checking here: fastddpm.ops checks at the boundary.
"""
import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None, dropout=0.0):
    """GroupNorm over (C/G, *spatial) per sample and group of x + add, then
    optional SiLU, then dropout (training-mode F.dropout, torch's RNG) when
    dropout > 0.

    x: (N, C, *spatial); weight, bias: (C,) or None; add: (N, C) or None (the
    timestep-embedding term of a ResBlock). act: None or "silu".
    """
    cd = _compute_dtype(x.dtype)
    w = None if weight is None else weight.to(cd)
    b = None if bias is None else bias.to(cd)
    if w is None and b is not None:  # F.group_norm's backward needs a weight when given a bias
        w = torch.ones(x.shape[1], dtype=cd, device=x.device)
    h = x.to(cd)
    if add is not None:
        h = h + add.to(cd).reshape(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(h, num_groups, w, b, eps)
    if act == "silu":
        y = F.silu(y)
    if dropout > 0:
        y = F.dropout(y, dropout, training=True)
    return y.to(x.dtype)


def conv1x1_ref(x, weight, bias=None, norm=None, residual=None):
    """1x1 convolution of x (N, K, *spatial) with weight (M, K) or (M, K, 1, 1)
    and bias (M,) or None, of GroupNorm(x) (no activation) when norm =
    (num_groups, gn_weight, gn_bias, eps) is given, plus residual (N, M,
    *spatial) when given. Computed in float32 (float64 if x or weight is);
    returns weight's dtype, promoted with residual's when there is one."""
    cd = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    h = x.to(cd)
    if norm is not None:
        num_groups, gn_weight, gn_bias, eps = norm
        h = group_norm_ref(h, num_groups, gn_weight, gn_bias, eps)
    N, K, M = x.shape[0], x.shape[1], weight.shape[0]
    y = torch.matmul(weight.reshape(M, K).to(cd), h.reshape(N, K, math.prod(x.shape[2:])))
    if bias is not None:
        y = y + bias.to(cd)[:, None]
    y = y.reshape(N, M, *x.shape[2:])
    if residual is None:
        return y.to(weight.dtype)
    return (y + residual.to(cd)).to(torch.promote_types(weight.dtype, residual.dtype))


def attention_ref(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, heads, L, d)."""
    cd = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    w = torch.softmax((q.to(cd) @ k.to(cd).transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.to(cd)).to(q.dtype)


def _gather(table, t, like):
    """table[t] as a (B, 1, ..., 1) tensor in like's compute dtype."""
    c = table.index_select(0, t).to(_compute_dtype(like.dtype))
    return c.view(-1, *([1] * (like.dim() - 1)))


def q_sample_ref(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t: int64 (B,)."""
    cd = _compute_dtype(x0.dtype)
    xt = _gather(sqrt_abar, t, x0) * x0.to(cd) + _gather(sqrt_one_minus_abar, t, x0) * noise.to(cd)
    return xt.to(x0.dtype)


def simple_loss_ref(eps_hat, noise):
    """L_simple: mean over all elements of (noise - eps_hat)^2, as a float32 scalar
    (float64 for float64 input)."""
    cd = _compute_dtype(eps_hat.dtype)
    return (noise.to(cd) - eps_hat.to(cd)).square().mean()


def p_sample_step_ref(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                      noise, clip=True):
    """One ancestral step (the paper's Algorithm 2, line 4) from eps_hat.

    x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps   (clipped to [-1, 1] if clip)
    mean   = coef1_t x0_hat + coef2_t x_t
    x_{t-1} = mean + [t > 0] exp(0.5 log_var_t) noise
    All coefficient tables are 1-D of length T; t is int64 (B,).
    """
    cd = _compute_dtype(x_t.dtype)
    x = x_t.to(cd)
    x0 = _gather(sqrt_recip_abar, t, x_t) * x - _gather(sqrt_recipm1_abar, t, x_t) * eps.to(cd)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    mean = _gather(coef1, t, x_t) * x0 + _gather(coef2, t, x_t) * x
    nonzero = (t != 0).to(cd).view(-1, *([1] * (x_t.dim() - 1)))
    std = torch.exp(0.5 * _gather(log_var, t, x_t))
    return (mean + nonzero * std * noise.to(cd)).to(x_t.dtype)
