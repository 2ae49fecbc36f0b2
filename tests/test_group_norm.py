"""GroupNorm(+SiLU): the Triton custom op against the float64 reference.

On the CPU the kernels run through TRITON_INTERPRET=1 (set by the root
conftest) at tiny shapes; the `gpu` tests run the real UNet shapes.
"""
import warnings

import pytest
import torch

import fastddpm.ops as ops
from fastddpm import reference
from fastddpm.kernels import group_norm as kgn
from _util import (HAS_CUDA, REL_TOL, assert_close_rel, capture_cuda_graph, expect_ran, rel_err,
                   run_sm90_compile_check, spread_groups)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (shape, groups, channels_last): groups == channels, odd channels, 1x1, 7x7,
# batch 1, 1-D and 0-D spatial, channels_last
CASES = [
    ((2, 8, 4, 4), 4, False),
    ((1, 6, 7, 7), 3, False),     # batch 1, odd channels (2 per group), 7x7
    ((2, 4, 3, 3), 4, False),     # groups == channels
    ((2, 8, 1, 1), 2, False),     # 1x1 spatial
    ((2, 6, 5, 3), 3, True),      # channels_last, non-square
    ((2, 6, 5), 2, False),        # (N, C, L)
    ((3, 12), 4, False),          # (N, C): no spatial dims
]
# the Triton custom ops: a test of the triton backend asserts they ran
_FAST_OPS = ("fastddpm::group_norm", "fastddpm::group_norm_backward")
CASE_IDS = [f"{'x'.join(map(str, s))}-g{g}{'-cl' if cl else ''}" for s, g, cl in CASES]


def _inputs(shape, groups, dtype, channels_last=False, affine=True, shift=0.0, scale=1.0, device=DEV):
    x = spread_groups(shape, groups, scale, shift, device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w = (torch.randn(C, device=device) * 0.5 + 1.0).to(dtype) if affine else None
    b = (torch.randn(C, device=device) * 0.5).to(dtype) if affine else None
    return x, w, b


def _run(backend, x, g, w, b, act, dy):
    """Forward and every gradient through ops.group_norm on `backend`."""
    xx, ww, bb = (None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b))
    leaves = [t for t in (xx, ww, bb) if t is not None]
    ran = _FAST_OPS if backend == "triton" else ()
    with ops.use_backend(backend), expect_ran(*ran):
        y = ops.group_norm(xx, g, ww, bb, 1e-6, act)
        grads = torch.autograd.grad(y, leaves, dy)
    return y, grads


def _ref(x, g, w, b, act, dy):
    """The float64 reference: forward and every gradient."""
    xx, ww, bb = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    leaves = [t for t in (xx, ww, bb) if t is not None]
    # F.group_norm's backward fails for bias without weight ("tensor does not have a
    # device"): give the reference an explicit unit weight that is not a leaf.
    w_used = torch.ones(x.shape[1], dtype=torch.float64, device=x.device) if ww is None and bb is not None else ww
    y = reference.group_norm_ref(xx, g, w_used, bb, 1e-6, act)
    return y, torch.autograd.grad(y, leaves, dy.double())


def _check_against_ref(x, g, w, b, act, backend="triton", tol=None):
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    y, grads = _run(backend, x, g, w, b, act, dy)
    y_ref, grads_ref = _ref(x, g, w, b, act, dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_rel(y, y_ref, x.dtype, "y", tol)
    names = [n for n, t in zip(("dx", "dweight", "dbias"), (x, w, b)) if t is not None]
    for name, gr, gr_ref in zip(names, grads, grads_ref):
        assert torch.isfinite(gr).all(), name
        assert_close_rel(gr, gr_ref, x.dtype, name, tol)
    return y


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,g,cl", CASES, ids=CASE_IDS)
def test_forward_backward_matches_reference(backend, dtype, shape, g, cl):
    x, w, b = _inputs(shape, g, dtype, cl)
    y = _check_against_ref(x, g, w, b, "silu", backend)
    if cl and backend == "triton":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_affine_variants(act, affine):
    x, w, b = _inputs((2, 6, 3, 3), 3, torch.float32)
    w = w if affine in ("both", "weight") else None
    b = b if affine in ("both", "bias") else None
    _check_against_ref(x, 3, w, b, act)


@pytest.mark.parametrize("dtype,cl", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)],
                         ids=["fp32-nchw", "bf16-cl", "fp16-nchw"])
def test_looped_path_matches_reference(monkeypatch, dtype, cl):
    """Groups larger than the on-chip tile take the looped (tiled, Chan-combined) path."""
    monkeypatch.setattr(kgn, "ONE_PASS_MAX", 16)
    monkeypatch.setattr(kgn, "LOOP_TILE", 16)
    assert kgn._blocks(5, 9, 16)[0] is False
    x, w, b = _inputs((2, 10, 3, 3), 2, dtype, cl)   # 5 channels x 9 positions per group
    _check_against_ref(x, 2, w, b, "silu")


def test_non_collapsible_layout_is_copied_not_wrong():
    base = torch.randn(2, 5, 6, 8, device=DEV)
    x = base.permute(0, 3, 1, 2)[:, :, ::2]             # (2, 8, 3, 6), no single spatial stride
    assert kgn.spatial_stride(x) is None
    w, b = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    _check_against_ref(x, 4, w, b, "silu")


@pytest.mark.parametrize("shift", [1e3, -3e3])
def test_large_mean_is_stable(shift):
    """mean 1e3, std 1: the two-pass/Chan statistics stay accurate where
    E[x^2] - E[x]^2 in fp32 does not."""
    _, w, b = _inputs((2, 8, 8, 8), 4, torch.float32)
    x = torch.randn(2, 8, 8, 8, device=DEV) + shift     # 128 per group: std 1 within a few %
    xd = x.double()
    y, mean, rstd = kgn.group_norm_fwd(x, 4, w, b, 1e-6, "silu")
    ref = reference.group_norm_ref(xd, 4, w.double(), b.double(), 1e-6, "silu")
    # fp32 statistics cannot beat the rounding of x - mean near |mean|: ~|mean| * 2^-24 / std
    tol = 1e-4 * max(1.0, abs(shift) / 1e3)
    assert rel_err(y, ref) < tol
    # as accurate as PyTorch's own fp32 kernel, within a factor of 2
    torch_err = rel_err(reference.group_norm_ref(x, 4, w, b, 1e-6, "silu"), ref)
    assert rel_err(y, ref) < 2 * torch_err + 1e-6
    var_ref = xd.view(2, 4, -1).var(-1, unbiased=False)
    assert rel_err(rstd, (var_ref + 1e-6).rsqrt()) < tol
    # the naive formula in fp32 really is off by orders of magnitude here
    xf = x.view(2, 4, -1)
    naive = (xf * xf).mean(-1) - xf.mean(-1) ** 2
    assert rel_err(naive, var_ref) > 1e-3
    # and the looped path too
    y2, _, _ = kgn.group_norm_fwd(x, 4, w, b, 1e-6, "silu", max_tile=32)
    assert rel_err(y2, ref) < tol


def test_outputs_are_fully_written(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: no element may be left unwritten."""
    monkeypatch.setattr(kgn, "POISON", True)
    for max_tile in (None, 16):
        x, w, b = _inputs((2, 6, 5, 3), 3, torch.float32, channels_last=True)
        y, mean, rstd = kgn.group_norm_fwd(x, 3, w, b, 1e-6, "silu", max_tile=max_tile)
        dy = torch.randn_like(y)
        dx, dw, db, _ = kgn.group_norm_bwd(dy, x, w, b, mean, rstd, 3, "silu", max_tile=max_tile)
        for t in (y, mean, rstd, dx, dw, db):
            assert torch.isfinite(t).all()
        ref = reference.group_norm_ref(x.double(), 3, w.double(), b.double(), 1e-6, "silu")
        assert_close_rel(y, ref, torch.float32)


@pytest.mark.parametrize("dtype,cl,max_tile", [(torch.float32, False, None), (torch.bfloat16, True, None),
                                                (torch.float32, True, 16)], ids=["fp32", "bf16-cl", "fp32-looped"])
def test_statistics_only(monkeypatch, dtype, cl, max_tile):
    """group_norm_scale_shift: the forward's statistics without writing y, and the
    GroupNorm folded to x * scale + shift in the same pass."""
    monkeypatch.setattr(kgn, "POISON", True)
    x, w, b = _inputs((2, 10, 3, 5), 2, dtype, cl, shift=3.0)    # 5 channels x 15 positions per group
    y, mean_ref, rstd_ref = kgn.group_norm_fwd(x, 2, w, b, 1e-6, None, max_tile=max_tile)
    scale, shift, mean, rstd = kgn.group_norm_scale_shift(x, 2, w, b, 1e-6, max_tile=max_tile)
    for t in (mean, rstd):
        assert t.shape == (2, 2) and t.dtype == torch.float32
    assert torch.equal(mean, mean_ref) and torch.equal(rstd, rstd_ref)
    assert scale.shape == shift.shape == (2, 10) and scale.is_contiguous() and shift.is_contiguous()
    ref = reference.group_norm_ref(x.double(), 2, w.double(), b.double(), 1e-6)
    folded = x.double() * scale.double()[:, :, None, None] + shift.double()[:, :, None, None]
    assert_close_rel(folded, ref, torch.float32, "x * scale + shift")
    # without affine parameters: scale = rstd, shift = -mean * rstd
    scale, shift, mean, rstd = kgn.group_norm_scale_shift(x, 2, eps=1e-6, max_tile=max_tile)
    assert torch.equal(mean, mean_ref) and torch.equal(rstd, rstd_ref)   # the statistics without affine
    assert torch.equal(scale, rstd_ref.repeat_interleave(5, 1))
    assert torch.equal(shift, -mean_ref.repeat_interleave(5, 1) * scale)


def test_out_argument_prefilled_with_nan():
    x, w, b = _inputs((2, 4, 3, 3), 2, torch.float16)
    out = torch.full_like(x, float("nan"))
    y, _, _ = kgn.group_norm_fwd(x, 2, w, b, 1e-6, None, out=out)
    assert y is out and torch.isfinite(out).all()
    assert_close_rel(out, reference.group_norm_ref(x.double(), 2, w.double(), b.double(), 1e-6), torch.float16)


def _assert_backward_deterministic(shape, groups, dtype, device=DEV):
    """Two backward launches on the same input give bit-identical dx, dweight, dbias."""
    x, w, b = _inputs(shape, groups, dtype, device=device)
    y, mean, rstd = kgn.group_norm_fwd(x, groups, w, b, 1e-6, "silu")
    dy = torch.randn_like(y)
    first = kgn.group_norm_bwd(dy, x, w, b, mean, rstd, groups, "silu")
    second = kgn.group_norm_bwd(dy, x, w, b, mean, rstd, groups, "silu")
    for a, c in zip(first[:3], second[:3]):
        assert torch.equal(a, c)


def test_backward_is_deterministic():
    _assert_backward_deterministic((3, 8, 4, 4), 2, torch.float32)


def test_expanded_and_strided_grad_output():
    """y.sum().backward() hands the backward a stride-0 dy."""
    x, w, b = _inputs((2, 4, 3, 3), 2, torch.float32)
    xx = x.clone().requires_grad_()
    with ops.use_backend("triton"), expect_ran(*_FAST_OPS):
        ops.group_norm(xx, 2, w, b, 1e-6, "silu").sum().backward()
    xr = x.double().requires_grad_()
    reference.group_norm_ref(xr, 2, w.double(), b.double(), 1e-6, "silu").sum().backward()
    assert_close_rel(xx.grad, xr.grad, torch.float32)


def test_float64_runs_the_reference():
    x, w, b = _inputs((2, 4, 3, 3), 2, torch.float64)
    with ops.use_backend("triton"):
        y = ops.group_norm(x, 2, w, b, 1e-6, "silu")
    assert y.dtype == torch.float64
    assert torch.equal(y, reference.group_norm_ref(x, 2, w, b, 1e-6, "silu"))


@pytest.mark.parametrize("dtype,cl,affine,act", [(torch.float32, False, True, "silu"),
                                                (torch.float16, True, False, None)],
                         ids=["fp32-nchw-affine-silu", "fp16-cl-plain"])
def test_opcheck(dtype, cl, affine, act):
    x, w, b = _inputs((2, 4, 3, 3), 2, dtype, cl, affine=affine)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    torch.library.opcheck(torch.ops.fastddpm.group_norm.default, (x, 2, w, b, 1e-6, act))
    x, w, b = (None if t is None else t.detach() for t in (x, w, b))
    y, mean, rstd = torch.ops.fastddpm.group_norm(x, 2, w, b, 1e-6, act)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastddpm.group_norm_backward.default,
                          (dy, x, w, b, mean, rstd, 2, act, None if b is None else b.dtype))
    assert len(leaves) == (3 if affine else 1)


def test_torch_compile_fullgraph():
    """The custom op under torch.compile(fullgraph=True), forward and backward."""
    from fastddpm.ops.group_norm import _group_norm_triton

    def f(x, w, b):
        return _group_norm_triton(x, 2, w, b, 1e-6, "silu") * 2.0

    x, w, b = _inputs((2, 4, 3, 3), 2, torch.float32)
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    compiled = torch.compile(f, fullgraph=True)
    y = compiled(*xs)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, xs, dy)
    xr = [t.double().requires_grad_() for t in (x, w, b)]
    y_ref = reference.group_norm_ref(xr[0], 2, xr[1], xr[2], 1e-6, "silu") * 2.0
    grads_ref = torch.autograd.grad(y_ref, xr, dy.double())
    assert_close_rel(y, y_ref, torch.float32)
    for gr, gr_ref in zip(grads, grads_ref):
        assert_close_rel(gr, gr_ref, torch.float32)


def test_torch_compile_fullgraph_public_op():
    def f(x):
        return ops.group_norm(x, 2, None, None, 1e-6, "silu")

    x, _, _ = _inputs((2, 4, 3, 3), 2, torch.float32, affine=False)
    with warnings.catch_warnings(), ops.use_backend("triton"):
        warnings.simplefilter("ignore")
        y = torch.compile(f, fullgraph=True)(x)
    assert_close_rel(y, reference.group_norm_ref(x.double(), 2, act="silu"), torch.float32)


def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 6, 3, 3, device=DEV)
    with pytest.raises(ValueError, match="divisible"):
        ops.group_norm(x, 4)
    with pytest.raises(ValueError, match="act"):
        ops.group_norm(x, 3, act="relu")
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm(x, 3, torch.randn(5, device=DEV))
    with pytest.raises(ValueError, match="eps"):
        ops.group_norm(x, 3, eps=0.0)
    with pytest.raises(TypeError, match="float"):
        ops.group_norm(x.to(torch.int32), 3)
    with pytest.raises(ValueError, match="shape"):
        ops.group_norm(torch.randn(6, device=DEV), 3)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kgn.group_norm_fwd(x.double(), 3)
    with pytest.raises(ValueError, match="divisible"):
        kgn.group_norm_fwd(x, 4)
    with pytest.raises(ValueError, match="dy"):
        y, m, r = kgn.group_norm_fwd(x, 3)
        kgn.group_norm_bwd(y[:1], x, None, None, m, r, 3)


def test_fwd_out_aliasing_an_input_is_refused():
    """group_norm_fwd(out=x): on the GPU the autotuner runs the kernel once per
    config on the first call of a key, each run reading the previous one's output
    as x, so the first answer was wrong. Refused (any overlap, views too)."""
    x = torch.randn(2, 6, 5, 5, device=DEV)
    w = torch.randn(6, device=DEV)
    with pytest.raises(ValueError, match="share memory with x"):
        kgn.group_norm_fwd(x, 3, out=x)
    with pytest.raises(ValueError, match="share memory with x"):
        buf = torch.randn(3, 6, 5, 5, device=DEV)
        kgn.group_norm_fwd(buf[1:], 3, out=buf[:2])
    y, _, _ = kgn.group_norm_fwd(x, 3, w, out=torch.empty_like(x))    # a separate buffer is fine
    assert_close_rel(y, reference.group_norm_ref(x.double(), 3, w.double()), torch.float32)


_COMPILE_SCRIPT = """
from fastddpm.kernels import group_norm as k
from fastddpm.kernels._util import compile_ptx
sig = dict(X="*bf16", Y="*bf16", W="*fp32", B="*fp32", Mean="*fp32", Rstd="*fp32", eps="fp32", numel="fp32",
           DY="*bf16", DX="*bf16", DWp="*fp32", DBp="*fp32", Add="*bf16", DAdd="*fp32", Seed="*i64", p="fp32",
           Keep="*u8", Scale="*fp32", Shift="*fp32")
for one in (True, False):
    for cpg, fused in ((1, False), (4, False), (4, True)):   # ints equal to 1 are specialised to constants
        c = dict(HAS_WEIGHT=True, HAS_BIAS=True, ACT_SILU=True, HAS_ADD=fused, DROPOUT=fused, ONE_PASS=one,
                 BLOCK_C=4, BLOCK_S=256, C_PER_G=cpg, S=1, stride_xs=1, stride_ys=1, WRITE_Y=True,
                 WRITE_AFFINE=False)
        assert "ld.global" in compile_ptx(k._group_norm_fwd_kernel, sig, c)
        c = dict(HAS_WEIGHT=True, HAS_BIAS=cpg == 1, WRITE_DB=True, ACT_SILU=True, HAS_ADD=fused, DROPOUT=fused,
                 ONE_PASS=one, BLOCK_C=4, BLOCK_S=256, C_PER_G=cpg, S=1, stride_xs=1, stride_dxs=1, stride_dys=1)
        assert "ld.global" in compile_ptx(k._group_norm_bwd_kernel, sig, c)
    # statistics only, folded to the per-channel scale and shift (the conv1x1 prologue's input)
    c = dict(HAS_WEIGHT=True, HAS_BIAS=True, ACT_SILU=False, HAS_ADD=False, DROPOUT=False, ONE_PASS=one,
             BLOCK_C=4, BLOCK_S=256, C_PER_G=4, S=1, stride_xs=1, stride_ys=1, WRITE_Y=False, WRITE_AFFINE=True)
    assert "st.global" in compile_ptx(k._group_norm_fwd_kernel, sig, c)
assert "st.global" in compile_ptx(k._dropout_mask_kernel, sig, dict(BLOCK_S=256))
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as numpy; compile them for an H100 (sm_90, no GPU
    needed) so that compiler-only errors show up on the CPU too."""
    run_sm90_compile_check(_COMPILE_SCRIPT)


# ----------------------------------------------------------------------------- fused add / dropout
# The ResBlock's second GroupNorm: dropout(SiLU(GroupNorm(x + add[:, :, None, None]))).


def _fused_ref(x, g, w, b, add, keep, p, dy):
    """float64 reference of the fused op with a given keep mask, and its gradients
    wrt (x, w, b, add)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, add)]
    y = reference.group_norm_ref(leaves[0], g, leaves[1], leaves[2], 1e-6, "silu", add=leaves[3])
    if keep is not None:
        y = y * keep.double() / (1.0 - p)
    return y, torch.autograd.grad(y, leaves, dy.double())


def _fused_triton(x, g, w, b, add, seed, p, dy):
    """The custom op with an explicit seed: forward and gradients wrt (x, w, b, add)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, add)]
    y = torch.ops.fastddpm.group_norm(leaves[0], g, leaves[1], leaves[2], 1e-6, "silu", leaves[3], seed, p)[0]
    return y, torch.autograd.grad(y, leaves, dy)


FUSED_CASES = [((2, 8, 5, 3), 4, False), ((2, 6, 7, 7), 3, True), ((3, 4, 1, 1), 1, False), ((2, 4, 6), 2, False)]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["add", "add+dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,g,cl", FUSED_CASES, ids=lambda v: str(v))
def test_fused_add_dropout_matches_reference(shape, g, cl, dtype, p):
    x, w, b = _inputs(shape, g, dtype, cl)
    add = torch.randn(shape[:2], device=DEV).to(dtype)
    seed = kgn.new_seed(DEV)
    keep = kgn.dropout_keep_mask(seed, shape, p) if p else None
    dy = torch.randn(shape, device=DEV).to(dtype)
    y, grads = _fused_triton(x, g, w, b, add, seed if p else None, p, dy)
    y_ref, grads_ref = _fused_ref(x, g, w, b, add, keep, p, dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_rel(y, y_ref, dtype, "y")
    if keep is not None:   # dropped elements are exact zeros, kept ones are not
        assert torch.equal(y == 0, ~keep)
    for name, gr, gr_ref in zip(("dx", "dweight", "dbias", "dadd"), grads, grads_ref):
        assert gr.dtype == dtype, name
        assert_close_rel(gr, gr_ref, dtype, name)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_fused_looped_path_matches_reference(monkeypatch, cl):
    monkeypatch.setattr(kgn, "ONE_PASS_MAX", 16)
    monkeypatch.setattr(kgn, "LOOP_TILE", 16)
    monkeypatch.setattr(kgn, "POISON", True)
    shape, p = (2, 10, 3, 5), 0.25                       # 5 channels x 15 positions per group
    x, w, b = _inputs(shape, 2, torch.float32, cl)
    add = torch.randn(shape[:2], device=DEV)
    seed = kgn.new_seed(DEV)
    dy = torch.randn(shape, device=DEV)
    y, grads = _fused_triton(x, 2, w, b, add, seed, p, dy)
    y_ref, grads_ref = _fused_ref(x, 2, w, b, add, kgn.dropout_keep_mask(seed, shape, p), p, dy)
    assert_close_rel(y, y_ref, torch.float32, "y")
    for name, gr, gr_ref in zip(("dx", "dweight", "dbias", "dadd"), grads, grads_ref):
        assert_close_rel(gr, gr_ref, torch.float32, name)


def test_dropout_mask_statistics_and_determinism():
    """Keep rate 1 - p at every position (including the four positions that share a
    Philox call), a fresh mask per call, repeatable under torch.manual_seed, the
    same mask for NCHW and channels_last."""
    shape, p = (4, 16, 15, 15), 0.2
    x, w, b = _inputs(shape, 4, torch.float32)
    add = torch.randn(shape[:2], device=DEV)
    with ops.use_backend("triton"), expect_ran("fastddpm::group_norm"):
        torch.manual_seed(5)
        y1 = ops.group_norm(x, 4, w, b, act="silu", add=add, dropout=p)
        y2 = ops.group_norm(x, 4, w, b, act="silu", add=add, dropout=p)
        torch.manual_seed(5)
        y3 = ops.group_norm(x.to(memory_format=torch.channels_last), 4, w, b, act="silu", add=add, dropout=p)
    keep1, keep2 = y1 != 0, y2 != 0
    assert not torch.equal(keep1, keep2)
    assert torch.equal(y1, y3)
    n = keep1.numel()
    for keep in (keep1, keep2):
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
        flat = keep.reshape(-1, shape[2] * shape[3])
        for r in range(4):     # positions s % 4 == r come from Philox output r
            sub = flat[:, r::4].double()
            assert abs(sub.mean().item() - (1 - p)) < 5 * (p * (1 - p) / sub.numel()) ** 0.5
    # neighbours that share a Philox call are not copies of each other
    assert (flat[:, 0::4][:, :3] != flat[:, 1::4][:, :3]).any()
    # the reference backend: F.dropout, same keep rate, same kept values
    with ops.use_backend("reference"):
        yr = ops.group_norm(x, 4, w, b, act="silu", add=add, dropout=p)
        y0 = ops.group_norm(x, 4, w, b, act="silu", add=add)
    assert abs((yr != 0).double().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    assert_close_rel(y1, torch.where(keep1, y0.double() / (1 - p), 0.0), torch.float32)


def test_fused_public_op_reference_and_triton_agree_without_dropout():
    x, w, b = _inputs((2, 8, 4, 4), 4, torch.bfloat16, channels_last=True)
    add = torch.randn(2, 8, device=DEV).to(torch.bfloat16)
    dy = torch.randn(x.shape, device=DEV).to(torch.bfloat16)
    outs = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
        with ops.use_backend(backend), expect_ran(*(_FAST_OPS if backend == "triton" else ())):
            y = ops.group_norm(leaves[0], 4, leaves[1], leaves[2], act="silu", add=leaves[3])
            outs[backend] = (y, *torch.autograd.grad(y, leaves, dy))
    y_ref, grads_ref = _fused_ref(x, 4, w, b, add, None, 0.0, dy)
    for backend, (y, *grads) in outs.items():
        assert_close_rel(y, y_ref, torch.bfloat16, backend)
        for gr, gr_ref in zip(grads, grads_ref):
            assert_close_rel(gr, gr_ref, torch.bfloat16, backend)


def test_fused_opcheck():
    x, w, b = _inputs((2, 4, 3, 3), 2, torch.float32)
    add = torch.randn(2, 4, device=DEV)
    seed = kgn.new_seed(DEV)
    args = (x.requires_grad_(), 2, w.requires_grad_(), b.requires_grad_(), 1e-6, "silu",
            add.requires_grad_(), seed, 0.3)
    torch.library.opcheck(torch.ops.fastddpm.group_norm.default, args)
    x, w, b, add = (t.detach() for t in (x, w, b, add))
    y, mean, rstd = torch.ops.fastddpm.group_norm(x, 2, w, b, 1e-6, "silu", add, seed, 0.3)
    torch.library.opcheck(torch.ops.fastddpm.group_norm_backward.default,
                          (torch.randn_like(y), x, w, b, mean, rstd, 2, "silu", b.dtype, add, seed, 0.3))


def test_fused_torch_compile_fullgraph():
    def f(x, w, b, add):
        return ops.group_norm(x, 2, w, b, 1e-6, "silu", add=add, dropout=0.5)

    x, w, b = _inputs((2, 4, 3, 3), 2, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, torch.randn(2, 4, device=DEV))]
    with warnings.catch_warnings(), ops.use_backend("triton"):
        warnings.simplefilter("ignore")
        y = torch.compile(f, fullgraph=True)(*leaves)
        y.sum().backward()
    keep = y != 0
    assert 0 < keep.sum() < keep.numel()
    y_ref = reference.group_norm_ref(x.double(), 2, w.double(), b.double(), 1e-6, "silu", add=leaves[3].double())
    assert_close_rel(y, torch.where(keep, y_ref * 2.0, 0.0), torch.float32)
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_bool_num_groups_is_refused_on_every_backend(backend):
    # issue 10: True passed isinstance(int) and ran as 1 group on the Triton path
    x = torch.randn(2, 4, 3, 3, device=DEV)
    with ops.use_backend(backend), pytest.raises(ValueError, match="num_groups must be a positive int"):
        ops.group_norm(x, True)


def test_fused_bad_input():
    x = torch.randn(2, 6, 3, 3, device=DEV)
    with pytest.raises(ValueError, match="add must have shape"):
        ops.group_norm(x, 3, add=torch.randn(2, 6, 1, 1, device=DEV))
    with pytest.raises(TypeError, match="float"):
        ops.group_norm(x, 3, add=torch.ones(2, 6, dtype=torch.int64, device=DEV))
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="dropout"):
            ops.group_norm(x, 3, dropout=bad)
    with pytest.raises(ValueError, match="seed"):
        kgn.group_norm_fwd(x, 3, p=0.1)
    with pytest.raises(ValueError, match="dropout p"):
        kgn.group_norm_fwd(x, 3, p=1.0)


def test_resblock_uses_the_fused_op_and_matches_reference():
    """ResBlock (eval: no dropout) on the triton backend equals the reference
    backend; in training its dropout follows torch.manual_seed."""
    from fastddpm.nn import ResBlock
    torch.manual_seed(0)
    blk = ResBlock(8, 8, 16, 0.3, 4, 1e-6).to(DEV)
    with torch.no_grad():
        blk.conv2.weight.normal_(0, 0.1)
    x, emb = torch.randn(2, 8, 6, 6, device=DEV), torch.randn(2, 16, device=DEV)
    blk.eval()
    with ops.use_backend("reference"):
        ref = blk(x, emb)
    with ops.use_backend("triton"), expect_ran("fastddpm::group_norm") as ran:
        out = blk(x, emb)
        assert ran["fastddpm::group_norm"] == 2      # both of the block's GroupNorms, fused
        blk.train()
        torch.manual_seed(3)
        a = blk(x, emb)
        torch.manual_seed(3)
        c = blk(x, emb)
        d = blk(x, emb)
    assert_close_rel(out, ref.double(), torch.float32)
    assert torch.equal(a, c) and not torch.equal(a, d)


# ----------------------------------------------------------------------------- GPU, real shapes

REAL = [((128, 128, 32, 32), 32), ((128, 256, 16, 16), 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,g", REAL, ids=["128x128x32x32", "128x256x16x16"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_gpu_real_shapes(dtype, shape, g, cl):
    torch.manual_seed(0)
    x, w, b = _inputs(shape, g, dtype, cl, device="cuda")
    _check_against_ref(x, g, w, b, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("C", [96, 128, 384, 640])
@pytest.mark.parametrize("hw", [1, 7, 16])
def test_gpu_channel_counts(C, hw):
    x, w, b = _inputs((4, C, hw, hw), 32, torch.bfloat16, device="cuda")
    _check_against_ref(x, 32, w, b, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_looped_large_groups(dtype):
    x, w, b = _inputs((2, 64, 64, 64), 4, dtype, device="cuda", shift=100.0)   # 16 x 4096 per group
    assert kgn._blocks(16, 4096, kgn.ONE_PASS_MAX)[0] is False
    _check_against_ref(x, 4, w, b, "silu")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """Forward and backward replay inside a CUDA graph and match eager results."""
    x, w, b = _inputs((8, 64, 16, 16), 16, torch.bfloat16, device="cuda")
    xs = x.clone().requires_grad_()
    ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.randn_like(x)

    def step():
        with ops.use_backend("triton"):
            y = ops.group_norm(xs, 16, ws, bs, 1e-6, "silu")
        return (y, *torch.autograd.grad(y, (xs, ws, bs), dy))

    graph, outs = capture_cuda_graph(step, warmup=3)
    new_x = torch.randn_like(x)
    with torch.no_grad():
        xs.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for o, e in zip(outs, eager):
        assert torch.equal(o, e)
    y_ref, _ = _ref(new_x, 16, w, b, "silu", dy)
    assert_close_rel(outs[0], y_ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_backward_deterministic_real_shape():
    _assert_backward_deterministic((128, 128, 32, 32), 32, torch.bfloat16, device="cuda")


assert set(REL_TOL) >= set(DTYPES)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,g", REAL, ids=["128x128x32x32", "128x256x16x16"])
def test_gpu_fused_add_dropout_real_shapes(shape, g):
    x, w, b = _inputs(shape, g, torch.bfloat16, device="cuda")
    add = torch.randn(shape[:2], device="cuda").to(torch.bfloat16)
    seed = kgn.new_seed("cuda")
    dy = torch.randn(shape, device="cuda").to(torch.bfloat16)
    y, grads = _fused_triton(x, g, w, b, add, seed, 0.1, dy)
    y_ref, grads_ref = _fused_ref(x, g, w, b, add, kgn.dropout_keep_mask(seed, shape, 0.1), 0.1, dy)
    assert_close_rel(y, y_ref, torch.bfloat16, "y")
    for name, gr, gr_ref in zip(("dx", "dweight", "dbias", "dadd"), grads, grads_ref):
        assert_close_rel(gr, gr_ref, torch.bfloat16, name)


@pytest.mark.gpu
def test_gpu_fused_dropout_in_cuda_graph_draws_fresh_masks():
    """The seed comes from torch's CUDA generator on the device: each replay of a
    captured graph draws a new mask (no host sync, no frozen mask)."""
    x, w, b = _inputs((8, 64, 16, 16), 16, torch.bfloat16, device="cuda")
    add = torch.randn(8, 64, device="cuda").to(torch.bfloat16)

    def step():
        with ops.use_backend("triton"):
            return ops.group_norm(x, 16, w, b, act="silu", add=add, dropout=0.3)

    graph, out = capture_cuda_graph(step, warmup=3)
    graph.replay()
    first = (out != 0).clone()
    graph.replay()
    torch.cuda.synchronize()
    second = out != 0
    assert not torch.equal(first, second)
    for keep in (first, second):
        assert abs(keep.float().mean().item() - 0.7) < 0.01
