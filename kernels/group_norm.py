"""GroupNorm (+ optional SiLU): Triton forward and backward kernels and thin launchers.

Layout: x is viewed as (N, C, S) with S = prod(spatial) and explicit strides
(stride_n, stride_c, stride_s). That covers contiguous NCHW (stride_s == 1) and
channels_last (stride_c == 1) natively; any other layout whose spatial dims do
not collapse into one stride is made contiguous once by the launcher.

One program handles one (sample, group). C_PER_G is a compile-time constant:
in channels_last a group's channels are contiguous, and only a constant count
(mask and alignment known to the compiler) lets them load as 16-byte vectors
(as a run-time int they compiled to 2-byte scalar loads; tests/test_compile_sm90.py
checks the PTX). Launchers refuse an `out` overlapping an input (the autotuner
reruns the kernel on the first call of a key). A group is a (C/G, S) tile:
  * ONE_PASS: the whole group is held on chip; mean, then the centred variance
    from the registers (two-pass on chip, never E[x^2] - E[x]^2), then write.
  * looped: tiles of (BLOCK_C, BLOCK_S); the statistics are combined tile by
    tile with Chan's parallel formula (tile mean + tile centred M2), then a
    second sweep normalises and writes.
Statistics (mean, rstd) are fp32 and are returned for the backward, which
recomputes x_hat and SiLU from them.

Two neighbours of the UNet ResBlock's second GroupNorm are fused (optional):
  * add: a per-(sample, channel) term (the timestep embedding) added to x on
    load, before the statistics; its gradient is the per-channel sum of dx,
    reduced in the backward kernel.
  * dropout after the activation: keep element (n, c, s) iff
    uniform(Philox(key=seed, counter=(s // 4, n * C + c, 0, 0))[s % 4]) >= p,
    kept values scaled by 1 / (1 - p). The mask depends only on the logical
    index (same for NCHW and channels_last) and is regenerated in the backward
    from the seed instead of being stored. `dropout_keep_mask` returns it. dweight/dbias are per-(sample, channel)
fp32 partials written without atomics and summed over the batch by the
launcher (deterministic).
"""
import math

import torch
import triton
import triton.language as tl

from fastddpm.kernels._util import interpreting, overlaps

# Largest group tile (elements) kept on chip in one pass; above it the kernels loop.
ONE_PASS_MAX = 16384
# Tile of the looped path.
LOOP_TILE = 4096
# Test hook: when True, every buffer the launchers allocate is filled with NaN
# first, so a kernel that forgets to write an element is caught.
POISON = False


def _configs():
    if interpreting():
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]


# One-pass tiles at least this large spill at 2-4 warps (sm_90 ptxas, bf16, 8-16K
# elements: 1-17 KB of stack per thread); 8 and 16 warps never spill.
_SPILL_TILE = 8192


def _prune_configs(configs, nargs, **kwargs):
    """early_config_prune of both kernels: drop the warp counts that cannot win, so
    the first call of a key benchmarks fewer configs. A one-pass tile of
    _SPILL_TILE+ elements at 2-4 warps spills; more threads than tile elements
    (warps with no element) only add reduction cost. Never empty."""
    a = {**nargs, **kwargs}
    tile = a["BLOCK_C"] * a["BLOCK_S"]
    keep = [c for c in configs
            if not (a["ONE_PASS"] and tile >= _SPILL_TILE and c.num_warps < 8) and 32 * c.num_warps <= max(tile, 64)]
    return keep or [min(configs, key=lambda c: c.num_warps)]


# What changes the compiled code (and so the best config) besides the dtypes,
# which the autotuner adds itself: sizes, tiles, fusions, and the layout
# (the spatial strides: 1 in NCHW, C in channels_last).
_FWD_KEY = ["C_PER_G", "S", "ONE_PASS", "BLOCK_C", "BLOCK_S", "HAS_WEIGHT", "HAS_BIAS", "ACT_SILU", "HAS_ADD",
            "DROPOUT", "WRITE_Y", "WRITE_AFFINE", "stride_xs", "stride_ys"]
_BWD_KEY = ["C_PER_G", "S", "ONE_PASS", "BLOCK_C", "BLOCK_S", "HAS_WEIGHT", "HAS_BIAS", "WRITE_DB", "ACT_SILU",
            "HAS_ADD", "DROPOUT", "stride_xs", "stride_dys", "stride_dxs"]


@triton.jit
def _dropout_keep(seed, row, s0, p, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(BLOCK_C, BLOCK_S) keep mask of rows `row` ((BLOCK_C, 1): n * C + c) and
    positions s0 .. s0 + BLOCK_S (s0 a multiple of 4). One Philox call gives the
    four positions 4q .. 4q + 3 of a row: a quarter of the random-number work."""
    q = s0 // 4 + tl.arange(0, BLOCK_S // 4)[None, :]
    c0 = (q + row * 0).to(tl.uint32)
    c1 = (row + q * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, zero, zero)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK_C, BLOCK_S])
    return tl.random.uint_to_uniform_float(r) >= p


@triton.jit
def _dropout_mask_kernel(Seed, Keep, S, p, BLOCK_S: tl.constexpr):
    """Keep mask (rows, S) as uint8: what the fused kernels apply (tests, debugging)."""
    row = tl.program_id(0)
    seed = tl.load(Seed)
    for s0 in range(0, S, BLOCK_S):
        keep = _dropout_keep(seed, tl.full([1, 1], 0, tl.int64) + row, s0, p, 1, BLOCK_S)
        offs = s0 + tl.arange(0, BLOCK_S)[None, :]
        tl.store(Keep + row.to(tl.int64) * S + offs, keep.to(tl.uint8), mask=offs < S)


@triton.autotune(configs=_configs(), key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_configs},
                 cache_results=True)
@triton.jit
def _group_norm_fwd_kernel(
    X,          # (N, C, S) input, any float dtype, strides (stride_xn, stride_xc, stride_xs)
    Y,          # (N, C, S) output, x's dtype, strides (stride_yn, stride_yc, stride_ys)
    W,          # (C,) weight (any float dtype); unused unless HAS_WEIGHT
    B,          # (C,) bias (any float dtype); unused unless HAS_BIAS
    Mean,       # (N, G) fp32 out, contiguous
    Rstd,       # (N, G) fp32 out, contiguous
    Add,        # (N, C) contiguous, any float dtype, added to x before the statistics; unused unless HAS_ADD
    Seed,       # (1,) int64 Philox key of the dropout mask; unused unless DROPOUT
    Scale,      # (N, C) fp32 out, contiguous: rstd * weight (GroupNorm = x * Scale + Shift); unused unless WRITE_AFFINE
    Shift,      # (N, C) fp32 out, contiguous: bias - mean * Scale; unused unless WRITE_AFFINE
    stride_xn,  # elements between samples of X
    stride_xc,  # elements between channels of X
    stride_xs,  # elements between spatial positions of X
    stride_yn,  # elements between samples of Y
    stride_yc,  # elements between channels of Y
    stride_ys,  # elements between spatial positions of Y
    C_PER_G: tl.constexpr,  # channels per group: a constant, so channels_last loads vectorise
    S,          # spatial positions per channel
    G,          # number of groups
    numel,      # C_PER_G * S as a float (elements per group)
    eps,        # variance epsilon
    p,          # dropout probability; unused unless DROPOUT
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_ADD: tl.constexpr,
    DROPOUT: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WRITE_Y: tl.constexpr,       # False: no Y (statistics and WRITE_AFFINE only; affine, dropout, SiLU unused)
    WRITE_AFFINE: tl.constexpr,  # write the per-(sample, channel) Scale and Shift of the normalisation
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    c_first = g * C_PER_G
    x_base = X + n.to(tl.int64) * stride_xn + c_first.to(tl.int64) * stride_xc
    y_base = Y + n.to(tl.int64) * stride_yn + c_first.to(tl.int64) * stride_yc
    row0 = n.to(tl.int64) * (G * C_PER_G) + c_first  # n * C + first channel of the group
    cs = tl.arange(0, BLOCK_C)[:, None]
    ss = tl.arange(0, BLOCK_S)[None, :]
    seed = 0
    scale = 1.0
    if DROPOUT:
        seed = tl.load(Seed)
        scale = 1.0 / (1.0 - p)

    if ONE_PASS:
        mask = (cs < C_PER_G) & (ss < S)
        x = tl.load(x_base + cs * stride_xc + ss * stride_xs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            a = tl.load(Add + row0 + cs, mask=cs < C_PER_G, other=0.0).to(tl.float32)
            x = tl.where(mask, x + a, 0.0)
        mean = tl.sum(x) / numel
        d = tl.where(mask, x - mean, 0.0)
        var = tl.sum(d * d) / numel
        rstd = 1.0 / tl.sqrt(var + eps)
        if WRITE_Y:
            y = d * rstd
            if HAS_WEIGHT:
                w = tl.load(W + c_first + cs, mask=cs < C_PER_G, other=0.0).to(tl.float32)
                y = y * w
            if HAS_BIAS:
                b = tl.load(B + c_first + cs, mask=cs < C_PER_G, other=0.0).to(tl.float32)
                y = y + b
            if ACT_SILU:
                y = y * tl.sigmoid(y)
            if DROPOUT:
                y = tl.where(_dropout_keep(seed, row0 + cs, 0, p, BLOCK_C, BLOCK_S), y * scale, 0.0)
            tl.store(y_base + cs * stride_yc + ss * stride_ys, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # sweep 1: Chan's combination of per-tile (count, mean, centred M2)
        mean = tl.full([], 0.0, tl.float32)
        m2 = tl.full([], 0.0, tl.float32)
        count = tl.full([], 0.0, tl.float32)
        for c0 in range(0, C_PER_G, BLOCK_C):
            if HAS_ADD:
                a = tl.load(Add + row0 + c0 + cs, mask=c0 + cs < C_PER_G, other=0.0).to(tl.float32)
            for s0 in range(0, S, BLOCK_S):
                mask = (c0 + cs < C_PER_G) & (s0 + ss < S)
                x = tl.load(x_base + (c0 + cs) * stride_xc + (s0 + ss) * stride_xs,
                            mask=mask, other=0.0).to(tl.float32)
                if HAS_ADD:
                    x = tl.where(mask, x + a, 0.0)
                n_b = (tl.minimum(C_PER_G - c0, BLOCK_C) * tl.minimum(S - s0, BLOCK_S)).to(tl.float32)
                mean_b = tl.sum(x) / n_b
                d = tl.where(mask, x - mean_b, 0.0)
                m2_b = tl.sum(d * d)
                total = count + n_b
                delta = mean_b - mean
                mean = mean + delta * (n_b / total)
                m2 = m2 + m2_b + delta * delta * (count * n_b / total)
                count = total
        rstd = 1.0 / tl.sqrt(m2 / numel + eps)
        # sweep 2: normalise (+ affine, SiLU) and write
        if WRITE_Y:
            for c0 in range(0, C_PER_G, BLOCK_C):
                cmask = c0 + cs < C_PER_G
                if HAS_WEIGHT:
                    w = tl.load(W + c_first + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    b = tl.load(B + c_first + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
                if HAS_ADD:
                    a = tl.load(Add + row0 + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
                for s0 in range(0, S, BLOCK_S):
                    mask = cmask & (s0 + ss < S)
                    x = tl.load(x_base + (c0 + cs) * stride_xc + (s0 + ss) * stride_xs,
                                mask=mask, other=0.0).to(tl.float32)
                    if HAS_ADD:
                        x = x + a
                    y = (x - mean) * rstd
                    if HAS_WEIGHT:
                        y = y * w
                    if HAS_BIAS:
                        y = y + b
                    if ACT_SILU:
                        y = y * tl.sigmoid(y)
                    if DROPOUT:
                        keep = _dropout_keep(seed, row0 + c0 + cs, s0, p, BLOCK_C, BLOCK_S)
                        y = tl.where(keep, y * scale, 0.0)
                    tl.store(y_base + (c0 + cs) * stride_yc + (s0 + ss) * stride_ys,
                             y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)
    if WRITE_AFFINE:
        # GroupNorm(x)[c] = x * scale[c] + shift[c] with scale = rstd * w, shift = b - mean * scale
        c1 = tl.arange(0, BLOCK_C)
        for c0 in range(0, C_PER_G, BLOCK_C):
            cmask = c0 + c1 < C_PER_G
            sc = tl.zeros([BLOCK_C], tl.float32) + rstd
            if HAS_WEIGHT:
                sc = sc * tl.load(W + c_first + c0 + c1, mask=cmask, other=0.0).to(tl.float32)
            sh = -mean * sc
            if HAS_BIAS:
                sh = sh + tl.load(B + c_first + c0 + c1, mask=cmask, other=0.0).to(tl.float32)
            tl.store(Scale + row0 + c0 + c1, sc, mask=cmask)
            tl.store(Shift + row0 + c0 + c1, sh, mask=cmask)


@triton.jit
def _group_norm_bwd_tile(
    x, dy, mask, mean, rstd, w, b,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
):
    """(x_hat, dz, dx_hat) of one tile: dz = dL/d(affine output), dx_hat = dz * w."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    z = xhat
    if HAS_WEIGHT:
        z = z * w
    if HAS_BIAS:
        z = z + b
    if ACT_SILU:
        sig = tl.sigmoid(z)
        dz = dy * (sig * (1.0 + z * (1.0 - sig)))
    else:
        dz = dy
    dz = tl.where(mask, dz, 0.0)
    if HAS_WEIGHT:
        dxhat = dz * w
    else:
        dxhat = dz
    return xhat, dz, dxhat


@triton.autotune(configs=_configs(), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_configs},
                 cache_results=True)
@triton.jit
def _group_norm_bwd_kernel(
    DY,         # (N, C, S) upstream gradient, strides (stride_dyn, stride_dyc, stride_dys)
    X,          # (N, C, S) forward input, strides (stride_xn, stride_xc, stride_xs)
    W,          # (C,) weight; unused unless HAS_WEIGHT
    B,          # (C,) bias; unused unless HAS_BIAS (read only to recompute SiLU)
    Mean,       # (N, G) fp32 saved mean, contiguous
    Rstd,       # (N, G) fp32 saved 1/sqrt(var + eps), contiguous
    DX,         # (N, C, S) out, x's dtype, strides (stride_dxn, stride_dxc, stride_dxs)
    DWp,        # (N, C) fp32 out: per-sample partial of dweight; unused unless HAS_WEIGHT
    DBp,        # (N, C) fp32 out: per-sample partial of dbias; unused unless WRITE_DB
    Add,        # (N, C) contiguous forward add term; unused unless HAS_ADD
    DAdd,       # (N, C) fp32 out: gradient of Add (per-channel sum of dx); unused unless HAS_ADD
    Seed,       # (1,) int64 Philox key of the forward's dropout mask; unused unless DROPOUT
    stride_dyn,  # elements between samples of DY
    stride_dyc,  # elements between channels of DY
    stride_dys,  # elements between spatial positions of DY
    stride_xn,   # elements between samples of X
    stride_xc,   # elements between channels of X
    stride_xs,   # elements between spatial positions of X
    stride_dxn,  # elements between samples of DX
    stride_dxc,  # elements between channels of DX
    stride_dxs,  # elements between spatial positions of DX
    C,          # channels (row length of DWp / DBp)
    C_PER_G: tl.constexpr,  # channels per group: a constant, so channels_last loads vectorise
    S,          # spatial positions per channel
    G,          # number of groups
    numel,      # C_PER_G * S as a float (elements per group)
    p,          # dropout probability; unused unless DROPOUT
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_DB: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_ADD: tl.constexpr,
    DROPOUT: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    c_first = g * C_PER_G
    x_base = X + n.to(tl.int64) * stride_xn + c_first.to(tl.int64) * stride_xc
    dy_base = DY + n.to(tl.int64) * stride_dyn + c_first.to(tl.int64) * stride_dyc
    dx_base = DX + n.to(tl.int64) * stride_dxn + c_first.to(tl.int64) * stride_dxc
    part_base = n.to(tl.int64) * C + c_first  # also n * C + first channel: the Philox row
    cs = tl.arange(0, BLOCK_C)[:, None]
    ss = tl.arange(0, BLOCK_S)[None, :]
    c1 = tl.arange(0, BLOCK_C)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    seed = 0
    scale = 1.0
    if DROPOUT:
        seed = tl.load(Seed)
        scale = 1.0 / (1.0 - p)

    if ONE_PASS:
        cmask = cs < C_PER_G
        mask = cmask & (ss < S)
        x = tl.load(x_base + cs * stride_xc + ss * stride_xs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + cs * stride_dyc + ss * stride_dys, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            x = x + tl.load(Add + part_base + cs, mask=cmask, other=0.0).to(tl.float32)
        if DROPOUT:
            dy = tl.where(_dropout_keep(seed, part_base + cs, 0, p, BLOCK_C, BLOCK_S), dy * scale, 0.0)
        w = 1.0
        b = 0.0
        if HAS_WEIGHT:
            w = tl.load(W + c_first + cs, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + c_first + cs, mask=cmask, other=0.0).to(tl.float32)
        xhat, dz, dxhat = _group_norm_bwd_tile(x, dy, mask, mean, rstd, w, b, HAS_WEIGHT, HAS_BIAS, ACT_SILU)
        if HAS_WEIGHT:
            tl.store(DWp + part_base + c1, tl.sum(dz * xhat, axis=1), mask=c1 < C_PER_G)
        if WRITE_DB:
            tl.store(DBp + part_base + c1, tl.sum(dz, axis=1), mask=c1 < C_PER_G)
        a = tl.sum(dxhat) / numel
        bb = tl.sum(dxhat * xhat) / numel
        dx = rstd * (dxhat - a - xhat * bb)
        tl.store(dx_base + cs * stride_dxc + ss * stride_dxs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_ADD:
            tl.store(DAdd + part_base + c1, tl.sum(tl.where(mask, dx, 0.0), axis=1), mask=c1 < C_PER_G)
    else:
        # sweep 1: group sums of dx_hat and dx_hat * x_hat; per-channel dweight/dbias partials
        sum_a = tl.full([], 0.0, tl.float32)
        sum_b = tl.full([], 0.0, tl.float32)
        for c0 in range(0, C_PER_G, BLOCK_C):
            cmask = c0 + cs < C_PER_G
            w = 1.0
            b = 0.0
            if HAS_WEIGHT:
                w = tl.load(W + c_first + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b = tl.load(B + c_first + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
            if HAS_ADD:
                a_c = tl.load(Add + part_base + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
            acc_dw = tl.zeros([BLOCK_C], tl.float32)
            acc_db = tl.zeros([BLOCK_C], tl.float32)
            for s0 in range(0, S, BLOCK_S):
                mask = cmask & (s0 + ss < S)
                x = tl.load(x_base + (c0 + cs) * stride_xc + (s0 + ss) * stride_xs,
                            mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_base + (c0 + cs) * stride_dyc + (s0 + ss) * stride_dys,
                             mask=mask, other=0.0).to(tl.float32)
                if HAS_ADD:
                    x = x + a_c
                if DROPOUT:
                    keep = _dropout_keep(seed, part_base + c0 + cs, s0, p, BLOCK_C, BLOCK_S)
                    dy = tl.where(keep, dy * scale, 0.0)
                xhat, dz, dxhat = _group_norm_bwd_tile(x, dy, mask, mean, rstd, w, b,
                                                       HAS_WEIGHT, HAS_BIAS, ACT_SILU)
                acc_dw += tl.sum(dz * xhat, axis=1)
                acc_db += tl.sum(dz, axis=1)
                sum_a += tl.sum(dxhat)
                sum_b += tl.sum(dxhat * xhat)
            if HAS_WEIGHT:
                tl.store(DWp + part_base + c0 + c1, acc_dw, mask=c0 + c1 < C_PER_G)
            if WRITE_DB:
                tl.store(DBp + part_base + c0 + c1, acc_db, mask=c0 + c1 < C_PER_G)
        a = sum_a / numel
        bb = sum_b / numel
        # sweep 2: dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))
        for c0 in range(0, C_PER_G, BLOCK_C):
            cmask = c0 + cs < C_PER_G
            w = 1.0
            b = 0.0
            if HAS_WEIGHT:
                w = tl.load(W + c_first + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b = tl.load(B + c_first + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
            if HAS_ADD:
                a_c = tl.load(Add + part_base + c0 + cs, mask=cmask, other=0.0).to(tl.float32)
            acc_dadd = tl.zeros([BLOCK_C], tl.float32)
            for s0 in range(0, S, BLOCK_S):
                mask = cmask & (s0 + ss < S)
                x = tl.load(x_base + (c0 + cs) * stride_xc + (s0 + ss) * stride_xs,
                            mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_base + (c0 + cs) * stride_dyc + (s0 + ss) * stride_dys,
                             mask=mask, other=0.0).to(tl.float32)
                if HAS_ADD:
                    x = x + a_c
                if DROPOUT:
                    keep = _dropout_keep(seed, part_base + c0 + cs, s0, p, BLOCK_C, BLOCK_S)
                    dy = tl.where(keep, dy * scale, 0.0)
                xhat, dz, dxhat = _group_norm_bwd_tile(x, dy, mask, mean, rstd, w, b,
                                                       HAS_WEIGHT, HAS_BIAS, ACT_SILU)
                dx = rstd * (dxhat - a - xhat * bb)
                tl.store(dx_base + (c0 + cs) * stride_dxc + (s0 + ss) * stride_dxs,
                         dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_ADD:
                    acc_dadd += tl.sum(tl.where(mask, dx, 0.0), axis=1)
            if HAS_ADD:
                tl.store(DAdd + part_base + c0 + c1, acc_dadd, mask=c0 + c1 < C_PER_G)


# ----------------------------------------------------------------------------- launchers

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def spatial_stride(x):
    """The one stride of x's spatial dims when they collapse into a single
    (S,) axis (contiguous NCHW, channels_last, ...), else None."""
    dims = [(x.shape[i], x.stride(i)) for i in range(2, x.dim()) if x.shape[i] != 1]
    if not dims:
        return 1
    for (_, st_outer), (sz_inner, st_inner) in zip(dims[:-1], dims[1:]):
        if st_outer != st_inner * sz_inner:
            return None
    return dims[-1][1]


def empty_output_like(x):
    """The output buffer for x: x's layout when its spatial dims collapse into one
    stride (contiguous, channels_last), else contiguous. Also what the fake
    implementation returns, so real and fake strides agree."""
    y = torch.empty_like(x)
    if x.dim() > 2 and spatial_stride(y) is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if POISON:
        y.fill_(float("nan"))
    return y


def _as_ncs(x):
    """(x or a contiguous copy, (stride_n, stride_c, stride_s)) with collapsible spatial dims."""
    st = spatial_stride(x)
    if st is None:
        x = x.contiguous()
        st = spatial_stride(x)
    return x, (x.stride(0), x.stride(1), st)


def _blocks(c_per_g, s, max_tile, dropout=False):
    """(ONE_PASS, BLOCK_C, BLOCK_S) for a (c_per_g, s) group. With dropout,
    BLOCK_S >= 4 (the mask is drawn four positions per Philox call)."""
    bc = triton.next_power_of_2(c_per_g)
    bs = max(triton.next_power_of_2(s), 4 if dropout else 1)
    if bc * bs <= max_tile:
        return True, bc, bs
    tile = min(max_tile, LOOP_TILE)
    bc = min(bc, max(1, tile // 16))
    bs = max(1, min(bs, tile // bc), 4 if dropout else 1)
    return False, bc, bs


def _check_launch(x, num_groups, act, add=None, seed=None, p=0.0):
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"group_norm kernel: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"group_norm kernel: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    if x.shape[1] % num_groups != 0:
        raise ValueError(f"group_norm kernel: channels {x.shape[1]} not divisible by groups {num_groups}")
    if act not in (None, "silu"):
        raise ValueError(f"group_norm kernel: act must be None or 'silu', got {act!r}")
    if x.device.type == "cpu" and not interpreting():
        raise ValueError("group_norm kernel: CPU tensors need TRITON_INTERPRET=1")
    if add is not None and (add.shape != x.shape[:2] or add.device != x.device
                            or add.dtype not in KERNEL_DTYPES):
        raise ValueError(f"group_norm kernel: add must be a float (N, C) = {tuple(x.shape[:2])} tensor on "
                         f"{x.device}, got {add.dtype} {tuple(add.shape)} on {add.device}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"group_norm kernel: dropout p must lie in [0, 1), got {p}")
    if p > 0.0:
        if seed is None or seed.shape != (1,) or seed.dtype != torch.int64 or seed.device != x.device:
            raise ValueError("group_norm kernel: dropout needs seed, a (1,) int64 tensor on x's device")
        if x.shape[0] * x.shape[1] >= 2**32 or math.prod(x.shape[2:]) >= 2**34:
            raise ValueError(f"group_norm kernel: dropout Philox counters overflow for shape {tuple(x.shape)}")


def _span(x, strides):
    c, s = x.shape[1], math.prod(x.shape[2:])
    return (c - 1) * abs(strides[1]) + (s - 1) * abs(strides[2]) + 1


def group_norm_fwd(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, *, add=None, seed=None,
                   p=0.0, out=None, max_tile=None):
    """GroupNorm(+SiLU)(+dropout) forward of x (+ add[:, :, None, ...]).
    x: (N, C, *spatial) fp16/bf16/fp32 (contiguous or channels_last natively,
    anything else copied once); add: (N, C) or None; p > 0 applies dropout with
    the mask of `seed` ((1,) int64 tensor on x's device; see dropout_keep_mask).

    Returns (y, mean, rstd): y like x (or `out` when given), mean/rstd (N, G) fp32
    statistics of x + add. `max_tile` caps the elements of a group held on chip
    (tests use it to force the looped path at small shapes).
    """
    _check_launch(x, num_groups, act, add, seed, p)
    y = empty_output_like(x) if out is None else out
    if y.shape != x.shape or y.dtype != x.dtype or spatial_stride(y) is None:
        raise ValueError("group_norm_fwd: out must have x's shape and dtype and collapsible spatial dims")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("add", add)):
        if out is not None and t is not None and overlaps(out, t):
            raise ValueError(f"group_norm_fwd: out must not share memory with {name} (no in-place: the "
                             f"autotuner reruns the kernel on the first call)")
    mean, rstd = _launch_fwd(x, num_groups, weight, bias, eps, act, add, seed, p, y, None, max_tile)
    return y, mean, rstd


def group_norm_scale_shift(x, num_groups, weight=None, bias=None, eps=1e-6, *, max_tile=None):
    """GroupNorm(x) (affine when weight/bias are given, no activation) folded to
    a per-(sample, channel) affine, from one read of x:
    GroupNorm(x)[n, c] = x[n, c] * scale[n, c] + shift[n, c].
    Returns (scale, shift, mean, rstd): scale = rstd * weight and shift = bias -
    mean * scale, (N, C) fp32 contiguous; mean/rstd (N, G) fp32 as group_norm_fwd's.
    What a consumer that normalises on load (kernels.conv1x1's prologue) needs."""
    _check_launch(x, num_groups, None)
    N, C = x.shape[0], x.shape[1]
    scale, shift = _empty((N, C), torch.float32, x.device), _empty((N, C), torch.float32, x.device)
    mean, rstd = _launch_fwd(x, num_groups, weight, bias, eps, None, None, None, 0.0, None, (scale, shift),
                             max_tile)
    if x.numel() == 0:
        scale.fill_(0.0), shift.fill_(0.0)
    return scale, shift, mean, rstd


def _launch_fwd(x, G, weight, bias, eps, act, add, seed, p, y, affine, max_tile):
    """Launch _group_norm_fwd_kernel on checked input: y None computes the
    statistics only; affine: the (scale, shift) buffers to fill, or None.
    Returns (mean, rstd)."""
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    mean = _empty((N, G), torch.float32, x.device)
    rstd = _empty((N, G), torch.float32, x.device)
    if x.numel() == 0:
        return mean.fill_(0.0), rstd.fill_(0.0)
    xc, (sxn, sxc, sxs) = _as_ncs(x)
    syn, syc, sys_ = (0, 0, 0) if y is None else (y.stride(0), y.stride(1), spatial_stride(y))
    if max(_span(xc, (sxn, sxc, sxs)), 0 if y is None else _span(y, (syn, syc, sys_))) >= 2**31:
        raise ValueError(f"group_norm kernel: one sample spans >= 2^31 elements ({tuple(x.shape)})")
    one_pass, bc, bs = _blocks(C // G, S, max_tile or ONE_PASS_MAX, dropout=p > 0)
    w = weight.contiguous() if weight is not None else xc
    b = bias.contiguous() if bias is not None else xc
    scale, shift = affine if affine is not None else (mean, rstd)
    _group_norm_fwd_kernel[(N * G,)](
        xc, xc if y is None else y, w, b, mean, rstd,
        add.contiguous() if add is not None else xc, seed if p > 0 else mean, scale, shift,
        sxn, sxc, sxs, syn, syc, sys_,
        C // G, S, G, float(C // G * S), float(eps), float(p),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT_SILU=act == "silu",
        HAS_ADD=add is not None, DROPOUT=p > 0, ONE_PASS=one_pass, BLOCK_C=bc, BLOCK_S=bs,
        WRITE_Y=y is not None, WRITE_AFFINE=affine is not None,
    )
    return mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, act=None, *, add=None, seed=None, p=0.0,
                   dbias_dtype=None, max_tile=None):
    """GroupNorm(+SiLU)(+dropout) backward from the saved fp32 mean/rstd (x_hat,
    SiLU and the dropout mask are recomputed; add, seed and p as in the forward).
    Returns (dx, dweight, dbias, dadd): dweight is None without weight; dbias is
    computed when bias is given or dbias_dtype is set (bias itself is only needed
    to recompute SiLU), else None; dadd (add's dtype; the per-channel sum of dx)
    is None without add. dweight/dbias come from per-(sample, channel) fp32
    partials and a batch sum (deterministic, no atomics)."""
    _check_launch(x, num_groups, act, add, seed, p)
    if dy.shape != x.shape:
        raise ValueError(f"group_norm_bwd: dy has shape {tuple(dy.shape)}, x {tuple(x.shape)}")
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    G = num_groups
    dx = empty_output_like(x)
    has_w, has_b = weight is not None, bias is not None
    if dbias_dtype is None and has_b:
        dbias_dtype = bias.dtype
    want_db = dbias_dtype is not None
    dwp = _empty((N, C), torch.float32, x.device) if has_w else None
    dbp = _empty((N, C), torch.float32, x.device) if want_db else None
    dadd = _empty((N, C), torch.float32, x.device) if add is not None else None
    if x.numel() > 0:
        xc, (sxn, sxc, sxs) = _as_ncs(x)
        dyc, (sdn, sdc, sds) = _as_ncs(dy.to(x.dtype))
        if max(_span(xc, (sxn, sxc, sxs)), _span(dyc, (sdn, sdc, sds))) >= 2**31:
            raise ValueError(f"group_norm kernel: one sample spans >= 2^31 elements ({tuple(x.shape)})")
        one_pass, bc, bs = _blocks(C // G, S, max_tile or ONE_PASS_MAX, dropout=p > 0)
        w = weight.contiguous() if has_w else xc
        b = bias.contiguous() if has_b else xc
        _group_norm_bwd_kernel[(N * G,)](
            dyc, xc, w, b, mean.contiguous(), rstd.contiguous(), dx,
            dwp if has_w else xc, dbp if want_db else xc,
            add.contiguous() if add is not None else xc, dadd if add is not None else xc,
            seed if p > 0 else mean,
            sdn, sdc, sds, sxn, sxc, sxs, dx.stride(0), dx.stride(1), spatial_stride(dx),
            C, C // G, S, G, float(C // G * S), float(p),
            HAS_WEIGHT=has_w, HAS_BIAS=has_b, WRITE_DB=want_db, ACT_SILU=act == "silu",
            HAS_ADD=add is not None, DROPOUT=p > 0, ONE_PASS=one_pass, BLOCK_C=bc, BLOCK_S=bs,
        )
    else:
        for part in (dwp, dbp, dadd):
            if part is not None:
                part.zero_()
    dweight = dwp.sum(0).to(weight.dtype) if has_w else None
    dbias = dbp.sum(0).to(dbias_dtype) if want_db else None
    return dx, dweight, dbias, None if add is None else dadd.to(add.dtype)


def new_seed(device):
    """A fresh dropout seed: a (1,) int64 tensor drawn from torch's generator of
    `device` on the device itself (no host sync; inside a CUDA graph each replay
    draws a new one), so torch.manual_seed makes runs repeatable."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed, shape, p):
    """The keep mask (bool, `shape` = (N, C, *spatial), logical NCHW order) the
    fused kernels apply for `seed` and probability p."""
    N, C, S = shape[0], shape[1], math.prod(shape[2:])
    if not 0.0 < p < 1.0 or seed.shape != (1,) or seed.dtype != torch.int64:
        raise ValueError("dropout_keep_mask: needs 0 < p < 1 and seed a (1,) int64 tensor")
    keep = torch.empty((N * C, S), dtype=torch.uint8, device=seed.device)
    if keep.numel():
        _dropout_mask_kernel[(N * C,)](seed, keep, S, float(p), BLOCK_S=max(4, min(1024, triton.next_power_of_2(S))))
    return keep.view(shape).bool()
