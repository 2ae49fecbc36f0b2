"""Replays: the reference computed with a fast path's own random stream.

A fast path that draws random numbers its own way (the GroupNorm dropout mask
from a seed, the seeded ancestral step's in-kernel Philox noise) cannot be
compared with the reference's draws. The dispatch's first-use check therefore
rewinds torch's generators to where the fast path started and calls the
replay registered beside it (`_backend.register(..., replay=...)`): it draws
the same seed, rebuilds the same mask or noise here in plain PyTorch (from the
kernels' documented formulas, not their code), and applies the reference math.
For inputs where the fast path draws nothing of its own (no dropout, or input
it hands to the reference) a replay returns None: the check then compares with
the reference itself. The C++ GroupNorm's replay lives beside its mask, in _cpp.py.
"""
import math

import torch

from fastddpm import reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_M32 = 0xFFFFFFFF


def _triton_uniform(words):
    """tl.random.uint_to_uniform_float of uint32 words (int64 tensors in [0, 2^32)):
    the word read as int32, negatives folded (-x - 1), times 4.6566127342e-10 in float32."""
    s = torch.where(words >= 2**31, words - 2**32, words)
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=words.device)


def triton_keep_mask(seed, shape, p):
    """The Triton GroupNorm's dropout keep mask (bool, `shape`, logical NCHW order):
    element (n, c, s) is kept iff uniform(word (0, 2, 1, 3)[s % 4] of Philox(seed, (s // 4, n C + c, 0, 0))) >= p."""
    rows, S = shape[0] * shape[1], math.prod(shape[2:])
    dev = seed.device
    q = torch.arange((S + 3) // 4, dtype=torch.int64, device=dev).view(1, -1)
    row = torch.arange(rows, dtype=torch.int64, device=dev).view(-1, 1)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    r0, r1, r2, r3 = torch.broadcast_tensors(*reference.philox4x32_ref(seed.reshape(()), q, row & _M32, zero, zero))
    # the kernel lays a call's words out as join(join(r0, r1), join(r2, r3)): positions 4q..4q+3
    # take r0, r2, r1, r3 (its docstring's "[s % 4]" reads them in call order)
    r = torch.stack((r0, r2, r1, r3), dim=-1).reshape(rows, -1)[:, :S]
    return (_triton_uniform(r) >= torch.tensor(p, dtype=torch.float32, device=dev)).view(shape)


def masked(x, num_groups, weight, bias, eps, act, add, p, keep):
    """The reference GroupNorm(+add)(+SiLU) with dropout by the given keep mask."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = reference.group_norm_ref(x.to(cd), num_groups, weight, bias, eps, act, add, 0.0)
    return (y * keep.to(cd) * (1.0 / (1.0 - p))).to(x.dtype)


def group_norm_triton(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None, dropout=0.0):
    """ops.group_norm's reference with the Triton path's dropout mask."""
    if dropout == 0 or x.dtype not in _KERNEL_DTYPES or x.numel() == 0 \
            or (add is not None and add.dtype not in _KERNEL_DTYPES):
        return None
    from fastddpm.kernels.group_norm import new_seed
    keep = triton_keep_mask(new_seed(x.device), x.shape, dropout)
    return masked(x, num_groups, weight, bias, eps, act, add, dropout, keep)


def p_sample_step_seeded_triton(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                                seed, offset=0, clip=True):
    """The seeded ancestral step's reference with the Triton kernel's noise: element
    e of the flattened batch uses Philox(seed, (e, t[b], offset lo, offset hi)),
    z = sqrt(-2 ln max(u1, 1e-7)) cos(2 pi u2) of its first two words."""
    tables = (sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var)
    needs_grad = torch.is_grad_enabled() and any(v.requires_grad for v in (x_t, eps, *tables))
    if x_t.dtype not in _KERNEL_DTYPES or x_t.numel() == 0 or needs_grad \
            or not all(tab.is_floating_point() for tab in tables):
        return None
    B, dev = x_t.shape[0], x_t.device
    D = x_t.numel() // B
    off = int(offset) % 2**64
    elem = torch.arange(B * D, dtype=torch.int64, device=dev).view(B, D)
    tc = t.clamp(0, min(tab.shape[0] for tab in tables) - 1).view(B, 1)
    c2 = torch.tensor(off & _M32, dtype=torch.int64, device=dev)
    c3 = torch.tensor(off >> 32, dtype=torch.int64, device=dev)
    w0, w1, _, _ = reference.philox4x32_ref(int(seed), elem & _M32, tc & _M32, c2, c3)
    u1 = _triton_uniform(w0).clamp_min(1e-7)
    u2 = _triton_uniform(w1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return reference.p_sample_step_ref(x_t, t, eps, *tables, z.view(x_t.shape), clip)
