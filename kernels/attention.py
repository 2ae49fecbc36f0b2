"""Flash attention in Triton: softmax(q k^T * scale) v, forward and backward.

Layout: q, k, v, o and their gradients are (B, H, L, D) with any strides (they
are passed explicitly, so views of a packed qkv tensor need no copy). The
forward streams over key blocks with an online softmax, so no L x L matrix
reaches memory, and saves only the log-sum-exp per query row (fp32, natural
log, (B, H, L) contiguous). The backward (FlashAttention-2 style, no atomics):

* `_attention_bwd_dq_kernel`, one program per query block: computes
  delta = rowsum(dO * O) (fp32, written for the next kernel; this is the
  "preprocess" step, fused here because the program reads dO anyway), takes
  the row max and sum of the scores in a first sweep over the keys (written
  for the next kernel too), then recomputes P block by block and accumulates
  dQ = scale * dS K.
* `_attention_bwd_dkdv_kernel`, one program per key block: recomputes P and
  accumulates dV = P^T dO and dK = scale * dS^T Q, dS = P * (dP - delta).

Robust at any logit size (|q.k| up to 1e8 and beyond tested): all three
kernels compute the scores as dot(q, k^T) with the same operands in the same
order, so they agree bit for bit; the backward's P = exp2(s - rowmax) / rowsum
from its own statistics is then the forward's P, one-hot exactly where the
forward's was (recomputing P from the saved lse instead put ulps of |q.k| into
the exponent: dq/dk errors of 1e-3 .. inf). delta is the diagonal of dO O^T,
the same products in the same order and precision as dP = dO V^T, so dP -
delta is exactly 0 on a one-hot row, as the true gradient ~0. The lse is
still returned (the op's output) and checked, but the kernels do not read it.
The cost: one more Q K^T sweep and one (BLOCK_M x BLOCK_M) product per dQ program.

Precision: fp16/bf16 inputs run tl.dot on the tensor cores with fp32
accumulation; P and dS are rounded to the input dtype before their matmuls (as
in FlashAttention). Softmax statistics (running max, sum, lse, delta) are fp32.
fp32 inputs use input_precision="ieee" by default (exact fp32 products, no
TF32: within ~1e-7 of float64, as plain fp32 torch). That path is for
exactness, not speed: on sm_90 it runs on FMA units and, at D = 256, spills
heavily (ptxas: ~10 KB of stack per thread). Pass input_precision="tf32" to
the launchers to trade exactness for speed; use bf16/fp16 for performance.

Sizes: any L >= 1 (rows and key columns past L are masked), 1 <= D <= 512
(the head dimension is padded to BLOCK_D = next power of two >= 16 with masked
loads/stores). Larger D raises ValueError; fastddpm.ops.attention falls back
to the reference for it.

Launch policy: on the GPU each kernel is autotuned over the few tiles listed
for its padded head dimension (_FWD_TILES, _BWD_TILES; key: L, BLOCK_D, the dot
precision, the head-dimension strides (layout) and the dtypes; results cached
on disk; tiles over a rough register/shared-memory budget are pruned, and when
none fits within L the smallest tile that fits the budget runs). Outputs must
not overlap inputs (refused: the autotuner reruns the kernels on a first call).
Under TRITON_INTERPRET=1 a single small config runs so that the CPU tests
exercise several blocks and the masks. Autotuning benchmarks on the first call for a new key, so warm up
before capturing a CUDA graph.

No autograd and no dispatch here: fastddpm.ops.attention wraps these
launchers in the torch.library ops `fastddpm::attention` (separate q, k, v) and
`fastddpm::attention_packed` (q, k, v viewed out of one (B, 3C, L) tensor, one
(B, 3C, L) gradient buffer written by the backward through the dq/dk/dv
arguments). Test hook: POISON = True NaN-fills every buffer allocated here.
"""
import math
import os

import torch
import triton
import triton.language as tl

from fastddpm.kernels._util import overlaps

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 512
# Test hook: when True, every buffer allocated here (new_empty, new_empty_like,
# and so every output and scratch buffer the launchers create) is NaN-filled
# first, so that an element no kernel writes shows up as NaN.
POISON = False
_LOG2E = 1.4426950408889634
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------
# Candidate tiles per padded head dimension, (BLOCK_M, BLOCK_N, num_warps,
# num_stages): a handful each, so that the first call at a new shape autotunes
# in seconds. Large heads get small tiles (the fp32 accumulators live in
# registers); the backward's dK/dV program keeps two (BLOCK_N, D) accumulators.
# For D = 256 (sm_90, bf16, ptxas -v of the UNet's L-contiguous qkv views with
# the 16-byte alignment hints the JIT gives aligned tensors; 2026-12-01, after
# the backward took its own row statistics): every forward tile compiles to
# wgmma with no spills; dQ spills 100 bytes at (64, 64) and none elsewhere (its
# BLOCK_M < 64 tiles fall back to mma.sync); dK/dV spills 112-204 bytes at
# (64, 64), (64, 32), (32, 64) and none at (64, 16), (16, 64), (32, 32).
# tests/test_compile_sm90.py bounds these (shared memory, spills) in CI. The
# autotuner measures which wins.
_FWD_TILES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    512: [(64, 32, 8, 2), (64, 16, 8, 1), (32, 32, 4, 2), (32, 16, 4, 1)],
}
_BWD_TILES = {
    64: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
    128: [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
    256: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 1), (32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 4, 1)],
    512: [(32, 16, 4, 1), (64, 16, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
}
_INTERPRET_TILE = (16, 16, 1, 1)


def _configs(tables):
    """Every distinct tile of `tables` as a triton.Config; under the interpreter
    the single small tile (several blocks even at the CPU tests' sizes)."""
    tiles = [_INTERPRET_TILE] if _INTERPRET else sorted({t for ts in tables.values() for t in ts})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def _tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _fits(c, block_d, elem, acc_rows, tiles_per_stage, resident_rows):
    """Rough register / shared-memory budget for one config on an H100."""
    threads = 32 * c.num_warps
    # fp32 accumulators (acc_rows x D) plus the resident input tiles, per thread
    regs = (acc_rows * block_d * 4 + resident_rows * block_d * elem) / 4 / threads
    smem = c.num_stages * tiles_per_stage * block_d * elem
    if elem == 4:
        # fp32 products run on the FMA units, which stage the resident tiles in
        # shared memory too (sm_90 ptxas, D = 256: up to 279 KB, over the 227 KB limit)
        smem += resident_rows * block_d * elem
    return regs <= 192 and smem <= 200 * 1024


def _pruner(tables, budget):
    """early_config_prune: the tiles listed for this BLOCK_D that fit the
    budget and do not overshoot L; never empty (the smallest listed tile)."""
    def prune(configs, nargs, **kwargs):
        a = {**nargs, **kwargs}
        d, elem, L = a["BLOCK_D"], a["Q"].element_size(), a["L"]
        listed = [c for c in configs if _tile(c) in tables[max(64, d)]]
        lpow = max(16, triton.next_power_of_2(L))
        fitting = [c for c in listed if _fits(c, d, elem, *budget(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))]
        keep = [c for c in fitting if c.kwargs["BLOCK_M"] <= max(32, lpow) and c.kwargs["BLOCK_N"] <= lpow]
        if keep:
            return keep
        # Nothing both fits and stays within L (short rows, e.g. L = 16 in the 4x4
        # middle block): the smallest tile that fits the register budget (the
        # smallest tile outright spilled 33 KB per thread there in fp32), more
        # warps first; only if none fits, the smallest listed.
        def size(c):
            return (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -c.num_warps)
        return [min(fitting or listed or configs, key=size)]
    return prune


# Autotune keys: what changes the compiled code besides the dtypes (which the
# autotuner adds itself): L, the padded head dimension, the dot precision and
# the layout (the head-dimension strides: 1 row-major, L for q/k/v viewed out
# of a (B, 3C, L) conv output).
_FWD_KEY = ["L", "BLOCK_D", "DOT_PRECISION", "stride_qd", "stride_kd", "stride_vd", "stride_od"]
_DQ_KEY = ["L", "BLOCK_D", "DOT_PRECISION", "stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod",
           "stride_dqd"]
_DKDV_KEY = ["L", "BLOCK_D", "DOT_PRECISION", "stride_qd", "stride_kd", "stride_vd", "stride_dod", "stride_dkd",
             "stride_dvd"]
# (acc_rows, streamed rows per stage, resident rows) of each kernel
_prune_fwd = _pruner(_FWD_TILES, lambda m, n: (m, 2 * n, m))           # acc; k, v streamed; q
_prune_dq = _pruner(_BWD_TILES, lambda m, n: (m, 2 * n, 3 * m))        # dq; k, v; q, do, o
_prune_dkdv = _pruner(_BWD_TILES, lambda m, n: (2 * n, 2 * m, 2 * n))  # dk, dv; q, do; k, v


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------
@triton.autotune(configs=_configs(_FWD_TILES), key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd},
                 cache_results=True)
@triton.jit
def _attention_fwd_kernel(
    Q,                                      # (B, H, L, D) input dtype
    K,                                      # (B, H, L, D)
    V,                                      # (B, H, L, D)
    O,                                      # (B, H, L, D) output, input dtype
    LSE,                                    # (B, H, L) fp32, contiguous: natural-log logsumexp per row
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    H,                                      # heads
    L,                                      # sequence length (queries = keys)
    D,                                      # head dimension (<= BLOCK_D)
    qk_scale,                               # scale * log2(e): scores in base-2 units
    BLOCK_M: tl.constexpr,                  # query rows per program
    BLOCK_N: tl.constexpr,                  # key rows per inner step
    BLOCK_D: tl.constexpr,                  # next power of two >= D (>= 16)
    DOT_PRECISION: tl.constexpr,            # "ieee" | "tf32" (fp32 inputs only)
):
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < L
    d_valid = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)           # (BLOCK_N, BLOCK_D)
        # the scores exactly as the backward kernels recompute them (same operands,
        # same order), so that its P is the forward's P at any logit size
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale       # (BLOCK_M, BLOCK_N)
        s = tl.where(n_valid[None, :], s, float("-inf"))
        # every key block holds at least one valid column, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)          # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=m_valid)


# ----------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------
@triton.autotune(configs=_configs(_BWD_TILES), key=_DQ_KEY, prune_configs_by={"early_config_prune": _prune_dq},
                 cache_results=True)
@triton.jit
def _attention_bwd_dq_kernel(
    Q,                                      # (B, H, L, D)
    K,                                      # (B, H, L, D)
    V,                                      # (B, H, L, D)
    O,                                      # (B, H, L, D) forward output
    DO,                                     # (B, H, L, D) grad of O
    LSE,                                    # (B, H, L) fp32 contiguous, from the forward (checked, not read)
    DELTA,                                  # (B, H, L) fp32 contiguous, written: rowsum(dO * O)
    ROWMAX,                                 # (B, H, L) fp32 contiguous, written: row max of the base-2 scores
    INVSUM,                                 # (B, H, L) fp32 contiguous, written: 1 / sum_j exp2(s_j - rowmax)
    DQ,                                     # (B, H, L, D) written
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    H,                                      # heads
    L,                                      # sequence length
    D,                                      # head dimension (<= BLOCK_D)
    scale,                                  # softmax scale
    BLOCK_M: tl.constexpr,                  # query rows per program
    BLOCK_N: tl.constexpr,                  # key rows per inner step
    BLOCK_D: tl.constexpr,                  # next power of two >= D (>= 16)
    DOT_PRECISION: tl.constexpr,            # "ieee" | "tf32" (fp32 inputs only)
):
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < L
    d_valid = offs_d < D
    md_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                 mask=md_mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
                mask=md_mask, other=0.0)
    # delta = rowsum(dO * O) as the diagonal of dO O^T: the same products, in the
    # same order and precision, as dP = dO V^T. Where a row's softmax is one-hot
    # (O = v_j exactly), dP_j - delta is then exactly 0, as the true dS ~ 0
    # (a plain sum cancelled to ulps of |dO||v|, times |k| in dQ: errors up to
    # 1e1 at |q.k| ~ 1e8). One (BLOCK_M x BLOCK_M) product per program.
    do_ot = tl.dot(do, tl.trans(o), input_precision=DOT_PRECISION)                # (BLOCK_M, BLOCK_M)
    eye = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
    delta = tl.sum(tl.where(eye, do_ot, 0.0), 1)                                   # (BLOCK_M,)
    row = bh.to(tl.int64) * L + offs_m
    tl.store(DELTA + row, delta, mask=m_valid)
    qk_scale = scale * 1.4426950408889634

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # Pass 1: the row max and sum of exactly the scores this backward recomputes
    # (the dK/dV kernel computes them in the same (q, k) operand order). P =
    # exp2(s - max) / sum is then exact where the forward was, at any logit
    # size: the saved lse cannot be used for it, because at |q.k| ~ 1e4 and up
    # its rounding (and that of scores recomputed in another order) is ulps of
    # |s|, and exp2(s - lse) of that error gave dq/dk errors of 1e-3 .. inf.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)           # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale       # (BLOCK_M, BLOCK_N)
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    inv_l = 1.0 / l_i
    tl.store(ROWMAX + row, m_i, mask=m_valid)
    tl.store(INVSUM + row, inv_l, mask=m_valid)

    # Pass 2: dQ = scale * dS K
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)           # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)           # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale       # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - m_i[:, None]) * inv_l[:, None]
        p = tl.where(n_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)                 # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.autotune(configs=_configs(_BWD_TILES), key=_DKDV_KEY,
                 prune_configs_by={"early_config_prune": _prune_dkdv}, cache_results=True)
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,                                      # (B, H, L, D)
    K,                                      # (B, H, L, D)
    V,                                      # (B, H, L, D)
    DO,                                     # (B, H, L, D) grad of O
    DELTA,                                  # (B, H, L) fp32 contiguous, from _attention_bwd_dq_kernel
    ROWMAX,                                 # (B, H, L) fp32 contiguous, from _attention_bwd_dq_kernel
    INVSUM,                                 # (B, H, L) fp32 contiguous, from _attention_bwd_dq_kernel
    DK,                                     # (B, H, L, D) written
    DV,                                     # (B, H, L, D) written
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    H,                                      # heads
    L,                                      # sequence length
    D,                                      # head dimension (<= BLOCK_D)
    scale,                                  # softmax scale
    BLOCK_M: tl.constexpr,                  # query rows per inner step
    BLOCK_N: tl.constexpr,                  # key rows per program
    BLOCK_D: tl.constexpr,                  # next power of two >= D (>= 16)
    DOT_PRECISION: tl.constexpr,            # "ieee" | "tf32" (fp32 inputs only)
):
    num_n = tl.cdiv(L, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    bh = pid // num_n
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < L
    d_valid = offs_d < D
    nd_mask = n_valid[:, None] & d_valid[None, :]

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)                                             # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)                                             # (BLOCK_N, BLOCK_D)
    qk_scale = scale * 1.4426950408889634

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * L
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + offs_m0
        m_valid = offs_m < L
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=md_mask, other=0.0)                                         # (BLOCK_M, BLOCK_D)
        do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                     mask=md_mask, other=0.0)                                        # (BLOCK_M, BLOCK_D)
        m_row = tl.load(ROWMAX + row_base + offs_m, mask=m_valid, other=0.0)
        inv_l = tl.load(INVSUM + row_base + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
        # the scores in the dQ kernel's operand order (q rows x k rows), so that they
        # equal the ones its row max was taken over, bit for bit; then transposed
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale       # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(tl.minimum(s - m_row[:, None], 0.0)) * inv_l[:, None]
        p = tl.where(m_valid[:, None], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)                 # (BLOCK_M, BLOCK_N), as in dQ
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=nd_mask)


# ----------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------
def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _check_inputs(names, tensors, like):
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, L, D), got shape {tuple(t.shape)}")
        if t.shape != like.shape:
            raise ValueError(f"attention: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if t.dtype != like.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype}, expected {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"attention: {name} is on {t.device}, expected {like.device}")
    if like.dtype not in _DOT_DTYPES:
        raise TypeError(f"attention kernel: dtype {like.dtype} is not supported (float16, bfloat16, float32)")
    B, H, L, D = like.shape
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"attention kernel: head dimension {D} is outside [1, {MAX_HEAD_DIM}]")
    if L < 1 or B * H < 1:
        raise ValueError(f"attention kernel: empty input of shape {tuple(like.shape)}")
    if like.device.type == "cpu" and not _INTERPRET:
        raise ValueError("attention kernel: CPU tensors need TRITON_INTERPRET=1 (set before importing triton kernels)")
    if like.device.type not in ("cpu", "cuda"):
        raise ValueError(f"attention kernel: device {like.device} is not supported")


def _precision(dtype, input_precision):
    if input_precision is None:
        return "ieee" if dtype == torch.float32 else "tf32"
    if input_precision not in ("ieee", "tf32"):
        raise ValueError(f"attention kernel: input_precision must be 'ieee' or 'tf32', got {input_precision!r}")
    return input_precision


def new_empty(shape, dtype, device):
    """torch.empty, or a NaN-filled tensor under POISON (the test hook)."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_empty_like(x):
    """torch.empty_like(x) (x's strides when x is dense, as torch keeps them),
    or NaN-filled under POISON."""
    if POISON:
        return torch.full_like(x, float("nan"))
    return torch.empty_like(x)


def empty_like_layout(x):
    """An uninitialised (B, H, L, D) tensor like x whose layout follows x's:
    L-contiguous (a transposed (B, H, D, L) buffer) when x is, as for q, k, v
    viewed out of a conv's (B, 3C, L) output, so that the caller's transpose
    back to (B, C, L) is free; row-major (B, H, L, D) otherwise."""
    B, H, L, D = x.shape
    if x.stride(-2) == 1 and x.stride(-1) != 1:
        return new_empty((B, H, D, L), x.dtype, x.device).transpose(-1, -2)
    return new_empty((B, H, L, D), x.dtype, x.device)


def _new_or_check(t, name, shape, dtype, device, like=None):
    if t is None:
        if like is not None:
            return empty_like_layout(like)
        return new_empty(shape, dtype, device)
    if t.shape != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"attention: {name} must be {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t


def _lse_buffer(t, name, shape, device):
    t = _new_or_check(t, name, shape, torch.float32, device)
    if not t.is_contiguous():
        raise ValueError(f"attention: {name} must be contiguous")
    return t


def _check_no_alias(outputs, inputs):
    """Outputs must not overlap inputs: the autotuner reruns the kernels on the
    first call of a key, and a run that overwrote an input would feed the next
    one wrong data (the check is by byte span, so it also refuses interleaved
    views of one buffer). Outputs may share a buffer (the packed op's dq, dk, dv)."""
    for name, t in outputs:
        for other, u in inputs:
            if overlaps(t, u):
                raise ValueError(f"attention: {name} must not share memory with {other}")


def attention_fwd(q, k, v, scale=None, o=None, lse=None, input_precision=None):
    """softmax(q k^T * scale) v for q, k, v of shape (B, H, L, D), any strides.

    scale defaults to 1/sqrt(D). o (B, H, L, D, q.dtype, any strides) and lse
    (B, H, L, fp32, contiguous) may be given to write into; a new o takes q's
    layout (see empty_like_layout). Returns (o, lse):
    lse is the natural-log log-sum-exp of each row of the scaled scores.
    """
    _check_inputs(("q", "k", "v"), (q, k, v), q)
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = _new_or_check(o, "o", q.shape, q.dtype, q.device, like=q)
    lse = _lse_buffer(lse, "lse", (B, H, L), q.device)
    _check_no_alias((("o", o), ("lse", lse)), (("q", q), ("k", k), ("v", v)))
    prec = _precision(q.dtype, input_precision)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)

    _attention_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, L, D, scale * _LOG2E,
        BLOCK_D=_block_d(D), DOT_PRECISION=prec,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale=None, dq=None, dk=None, dv=None, delta=None,
                  input_precision=None):
    """Gradients of attention_fwd: returns (dq, dk, dv) in q.dtype, new ones
    in the layouts of q, k, v (see empty_like_layout).

    do, q, k, v, o: (B, H, L, D), any strides; lse: (B, H, L) fp32 contiguous
    from attention_fwd with the same scale. dq, dk, dv (any strides) and delta
    ((B, H, L) fp32 contiguous scratch for rowsum(dO * O)) may be given.
    """
    _check_inputs(("q", "k", "v", "o", "do"), (q, k, v, o, do), q)
    B, H, L, D = q.shape
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, L) or lse.dtype != torch.float32 \
            or lse.device != q.device or not lse.is_contiguous():
        raise ValueError(f"attention: lse must be a contiguous float32 tensor of shape {(B, H, L)} on {q.device}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = _new_or_check(dq, "dq", q.shape, q.dtype, q.device, like=q)
    dk = _new_or_check(dk, "dk", q.shape, q.dtype, q.device, like=k)
    dv = _new_or_check(dv, "dv", q.shape, q.dtype, q.device, like=v)
    delta = _lse_buffer(delta, "delta", (B, H, L), q.device)
    _check_no_alias((("dq", dq), ("dk", dk), ("dv", dv), ("delta", delta)),
                    (("do", do), ("q", q), ("k", k), ("v", v), ("o", o), ("lse", lse)))
    rowmax, invsum = new_empty((2, B, H, L), torch.float32, q.device).unbind(0)  # row stats of the backward's P
    prec = _precision(q.dtype, input_precision)
    block_d = _block_d(D)

    def grid_m(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)

    def grid_n(meta):
        return (triton.cdiv(L, meta["BLOCK_N"]) * B * H,)

    _attention_bwd_dq_kernel[grid_m](
        q, k, v, o, do, lse, delta, rowmax, invsum, dq,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        H, L, D, scale,
        BLOCK_D=block_d, DOT_PRECISION=prec,
    )
    _attention_bwd_dkdv_kernel[grid_n](
        q, k, v, do, delta, rowmax, invsum, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, L, D, scale,
        BLOCK_D=block_d, DOT_PRECISION=prec,
    )
    return dq, dk, dv
