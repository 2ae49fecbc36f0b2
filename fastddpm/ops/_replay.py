"""Replays: the reference computed with a fast path's own random stream.

A fast path that draws random numbers its own way (the GroupNorm dropout mask
from a seed) cannot be compared with the reference's draws. (The seeded
ancestral step needs none: its reference draws the Triton kernel's own Philox
normals, reference.seeded_step_noise_ref.) The dispatch's first-use check therefore
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
