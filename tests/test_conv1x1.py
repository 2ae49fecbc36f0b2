"""ops.conv1x1 (1x1 conv as a per-sample GEMM, optional GroupNorm prologue and
residual epilogue) and its Triton kernel against a float64 reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by the root conftest)
at tiny fp32 shapes that straddle the interpreter's 16 x 16 x 8 tiles; the
`gpu` tests run the AttentionBlock's projections (B=128, C=256, 16x16) in bf16,
inside a CUDA graph and under torch.compile.
"""
import math
import warnings

import pytest
import torch

import fastddpm.ops as ops
from fastddpm import reference
from fastddpm.kernels import conv1x1 as kconv
from _util import HAS_CUDA, REL_TOL, assert_close_rel, capture_cuda_graph, rel_err, run_sm90_compile_check
from _util import block_fwd_bwd, fresh_seed, randomised_attention_block

DEV = "cuda" if HAS_CUDA else "cpu"
# fp32 gradients through the GroupNorm backward (and dW, a sum over N * L
# products) land a few 1e-7 from float64: bound them at 3e-6, well under 1e-5.
GRAD_TOL = {torch.float32: 3e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EPS = 1e-6
NAMES = ("x", "weight", "bias", "gn_weight", "gn_bias", "residual")

# (N, K, M, spatial, groups, channels_last): several M, L and K tiles with
# ragged ends, (N, K, L) input with groups == channels, batch 1, odd M, 1x1
# spatial with one group. Every group holds >= 5 elements: in tiny groups the
# variance can be tiny, GroupNorm is ill-conditioned (plain fp32 torch lands
# ~6e-6 from float64 on dx with 3-element groups) and the folded x * scale +
# shift cancels two terms ~|x| * rstd large (a one-element group: variance 0,
# rstd = 1/sqrt(eps), absolute error ~|x| * rstd * 2^-24).
CASES = [
    (2, 12, 24, (4, 5), 3, False),
    (2, 8, 6, (5,), 8, False),
    (1, 10, 17, (3, 3), 5, True),
    (3, 9, 7, (1, 1), 1, False),
]
CASE_IDS = [f"n{n}k{k}m{m}-{'x'.join(map(str, s))}-g{g}{'-cl' if cl else ''}" for n, k, m, s, g, cl in CASES]
FUSIONS = ["plain", "norm", "residual", "norm+residual"]


def _inputs(N, K, M, spatial, fusion="norm+residual", dtype=torch.float32, cl=False, device=DEV,
            bias=True, gn_affine=(True, True), shift=0.0):
    """{name: tensor or None} for ops.conv1x1; x (N, K, *spatial), weight (M, K, 1, 1)."""
    x = torch.randn(N, K, *spatial, device=device) + shift
    if cl:
        x = x.to(memory_format=torch.channels_last)
    t = dict(x=x, weight=torch.randn(M, K, 1, 1, device=device) / math.sqrt(K),
             bias=torch.randn(M, device=device) if bias else None, gn_weight=None, gn_bias=None, residual=None)
    if "norm" in fusion:
        t["gn_weight"] = torch.randn(K, device=device) * 0.5 + 1.0 if gn_affine[0] else None
        t["gn_bias"] = torch.randn(K, device=device) * 0.5 if gn_affine[1] else None
    if "residual" in fusion:
        t["residual"] = torch.randn(N, M, *spatial, device=device)
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def _call(t, groups):
    norm = None if groups is None else (groups, t["gn_weight"], t["gn_bias"], EPS)
    return ops.conv1x1(t["x"], t["weight"], t["bias"], norm=norm, residual=t["residual"])


def _fwd_bwd(t, groups, dout, backend, double=False):
    """Output and {name: gradient} of every given input through ops.conv1x1 on `backend`."""
    leaves = {k: (v.detach().double() if double else v.detach().clone()).requires_grad_()
              for k, v in t.items() if v is not None}
    with ops.use_backend(backend):
        out = _call({k: leaves.get(k) for k in NAMES}, groups)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.double() if double else dout)
    return out, dict(zip(leaves, grads))


def _check_against_float64(t, groups, dtype, tag, dout=None, tol=None):
    """The triton backend (forward and every gradient) against the float64 reference."""
    dout = torch.randn(_call(t, groups).shape, device=t["x"].device).to(dtype) if dout is None else dout
    out, grads = _fwd_bwd(t, groups, dout, "triton")
    ref, grads64 = _fwd_bwd(t, groups, dout, "reference", double=True)
    assert out.dtype == dtype and out.shape == ref.shape
    res = t["residual"]
    # the residual would dilute the error of the conv: compare out - residual
    branch, branch64 = (out, ref) if res is None else (out.double() - res.double(), ref - res.double())
    assert_close_rel(branch, branch64, dtype, f"out {tag}", tol=tol)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"d{name} {tag}"
        assert g.dtype == t[name].dtype and g.shape == t[name].shape, f"d{name} {tag}"
        assert_close_rel(g, grads64[name], dtype, f"d{name} {tag}", tol=tol or GRAD_TOL[dtype])
    return out, grads


# ----------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("fusion", ["plain", "norm+residual"])
@pytest.mark.parametrize("x_left", [True, False], ids=["x_left", "w_left"])
@pytest.mark.parametrize("layout", ["nkl", "nlk"])
def test_kernel_matches_float64(monkeypatch, fusion, x_left, layout):
    """The launcher into NaN-poisoned buffers, both product orientations, x
    channel-major or channel-fastest; 2 x 2 x 2 tiles of M, L and K, all ragged."""
    monkeypatch.setattr(kconv, "POISON", True)
    seed = fresh_seed()
    N, K, M, L = 2, 12, 24, 20
    x = torch.randn(N, K, L, device=DEV) if layout == "nkl" else torch.randn(N, L, K, device=DEV).transpose(1, 2)
    w, b = torch.randn(M, K, device=DEV), torch.randn(M, device=DEV)
    scale = shift = res = None
    p = x.double()
    if "norm" in fusion:
        scale, shift = torch.randn(N, K, device=DEV), torch.randn(N, K, device=DEV)
        p = p * scale.double()[:, :, None] + shift.double()[:, :, None]
    ref = torch.matmul(w.double(), p) + b.double()[:, None]
    if "residual" in fusion:
        res = torch.randn(N, M, L, device=DEV)
        ref = ref + res.double()
    cfg = dict(BLOCK_M=16, BLOCK_L=16, BLOCK_K=16 if HAS_CUDA else 8, X_LEFT=x_left)   # compiled tl.dot: K >= 16
    out = kconv.conv1x1_fwd(x, w, b, scale=scale, shift=shift, residual=res, config=cfg)
    assert out.shape == (N, M, L) and out.dtype == torch.float32
    assert torch.isfinite(out).all(), f"unwritten (NaN) elements, seed {seed}"
    assert_close_rel(out, ref, torch.float32, f"out seed {seed}")
    # a new output follows x's layout
    assert (out.stride(1) == 1) == (layout == "nlk")
    # the autotuned (here: the one interpreter config) path and a given `out`
    out2 = torch.full((N, L, M), float("nan"), device=DEV).transpose(1, 2)
    assert kconv.conv1x1_fwd(x, w, b, scale=scale, shift=shift, residual=res, out=out2) is out2
    assert_close_rel(out2, ref, torch.float32, f"out= seed {seed}")


def test_kernel_weight_4d_no_bias_and_input_precision():
    seed = fresh_seed()
    x, w = torch.randn(2, 9, 7, device=DEV), torch.randn(5, 9, 1, 1, device=DEV)
    ref = torch.matmul(w.double().reshape(5, 9), x.double())
    assert_close_rel(kconv.conv1x1_fwd(x, w), ref, torch.float32, f"seed {seed}")
    assert_close_rel(kconv.conv1x1_fwd(x, w, input_precision="ieee"), ref, torch.float32, f"seed {seed}")
    with pytest.raises(ValueError, match="input_precision"):
        kconv.conv1x1_fwd(x, w, input_precision="bf16x3")


def test_kernel_bad_input_errors():
    x, w = torch.randn(2, 6, 5, device=DEV), torch.randn(4, 6, device=DEV)
    sc = torch.randn(2, 6, device=DEV)
    with pytest.raises(ValueError, match=r"\(N, K, L\)"):
        kconv.conv1x1_fwd(x[0], w)
    with pytest.raises(ValueError, match="weight must have shape"):
        kconv.conv1x1_fwd(x, w[:, :5])
    with pytest.raises(ValueError, match="weight must be"):
        kconv.conv1x1_fwd(x, w[:, :, None])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kconv.conv1x1_fwd(x.double(), w)
    with pytest.raises(TypeError, match="x and weight"):
        kconv.conv1x1_fwd(x.tolist(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        kconv.conv1x1_fwd(x, w, torch.randn(5, device=DEV))
    with pytest.raises(ValueError, match="come together"):
        kconv.conv1x1_fwd(x, w, scale=sc)
    with pytest.raises(TypeError, match="scale"):
        kconv.conv1x1_fwd(x, w, scale=sc.double(), shift=sc)
    with pytest.raises(ValueError, match="contiguous"):
        kconv.conv1x1_fwd(x, w, scale=torch.randn(6, 2, device=DEV).t(), shift=sc)
    with pytest.raises(ValueError, match="residual must have shape"):
        kconv.conv1x1_fwd(x, w, residual=torch.randn(2, 4, 4, device=DEV))
    with pytest.raises(TypeError, match="out must be"):
        kconv.conv1x1_fwd(x, w, out=torch.empty(2, 4, 5, device=DEV, dtype=torch.float16))
    if not HAS_CUDA:
        with pytest.raises(TypeError, match="interpreter"):
            kconv.conv1x1_fwd(x, w.to(torch.bfloat16))


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("N,K,M,spatial,groups,cl", CASES, ids=CASE_IDS)
def test_op_forward_backward_fp32(N, K, M, spatial, groups, cl, fusion):
    seed = fresh_seed()
    t = _inputs(N, K, M, spatial, fusion, cl=cl)
    g = groups if "norm" in fusion else None
    out, _ = _check_against_float64(t, g, torch.float32, f"seed {seed}")
    assert "fastddpm_conv1x1" in type(out.grad_fn).__name__, "the triton backend did not run the kernel"
    if cl:   # channels_last in, channels_last out
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fusion", ["plain", "norm+residual"])
@pytest.mark.parametrize("N,K,M,spatial,groups,cl", CASES[:3], ids=CASE_IDS[:3])
def test_op_forward_backward_fp16(N, K, M, spatial, groups, cl, fusion):
    # fp16 runs the kernels on the CPU too: the interpreter's fp16 tl.dot is exact
    # (only bf16's is missing), so this is the GPU's fp16 path at small shapes
    seed = fresh_seed()
    t = _inputs(N, K, M, spatial, fusion, dtype=torch.float16, cl=cl)
    g = groups if "norm" in fusion else None
    out, _ = _check_against_float64(t, g, torch.float16, f"seed {seed}")
    assert "fastddpm_conv1x1" in type(out.grad_fn).__name__, "the triton backend did not run the kernel"


@pytest.mark.parametrize("gn_affine,bias", [((False, False), False), ((True, False), True), ((False, True), False)],
                         ids=["no-affine-no-bias", "gn-weight-only", "gn-bias-only"])
def test_op_optional_parameters(gn_affine, bias):
    seed = fresh_seed()
    t = _inputs(2, 8, 12, (3, 5), "norm+residual", gn_affine=gn_affine, bias=bias)
    _check_against_float64(t, 2, torch.float32, f"seed {seed}")


def test_op_large_mean_prologue():
    """x with mean 1e3 and std 1: the folded affine x * scale + shift cancels two
    ~1e3-sized terms; fp32 rounding then costs ~|mean| * 2^-24 / std, as in
    kernels.group_norm's own large-mean test."""
    seed = fresh_seed()
    t = _inputs(2, 8, 6, (4, 4), "norm", shift=1e3)
    with ops.use_backend("triton"):
        out = _call(t, 4)
    ref = reference.conv1x1_ref(*(t[k].double() for k in ("x", "weight", "bias")),
                                (4, t["gn_weight"].double(), t["gn_bias"].double(), EPS))
    assert rel_err(out, ref) < 1e-4, f"seed {seed}"


def test_op_noncollapsible_input_and_residual_are_copied_not_wrong():
    seed = fresh_seed()
    t = _inputs(2, 8, 6, (3, 6), "norm+residual")
    t["x"] = torch.randn(2, 8, 6, 3, device=DEV).transpose(-1, -2)      # no single spatial stride
    t["residual"] = torch.randn(2, 6, 6, 3, device=DEV).transpose(-1, -2)
    from fastddpm.kernels.group_norm import spatial_stride
    assert spatial_stride(t["x"]) is None
    _check_against_float64(t, 4, torch.float32, f"seed {seed}")


def test_op_expanded_grad_output():
    """out.sum().backward() hands the backward a stride-0 d out."""
    t = _inputs(2, 8, 6, (3, 3), "norm+residual")
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    with ops.use_backend("triton"):
        _call(leaves, 2).sum().backward()
    ref = {k: v.double().requires_grad_() for k, v in t.items()}
    with ops.use_backend("reference"):
        _call(ref, 2).sum().backward()
    for k in NAMES:
        assert_close_rel(leaves[k].grad, ref[k].grad, torch.float32, f"d{k}", tol=GRAD_TOL[torch.float32])


def test_op_outputs_not_differentiable_and_fully_written(monkeypatch):
    monkeypatch.setattr(kconv, "POISON", True)
    t = _inputs(2, 8, 6, (3, 3), "norm+residual")
    x = t["x"].requires_grad_()
    out, mean, rstd = torch.ops.fastddpm.conv1x1(x, t["weight"].reshape(6, 8), t["bias"], t["residual"], 2,
                                                 t["gn_weight"], t["gn_bias"], EPS)
    assert out.requires_grad and not mean.requires_grad and not rstd.requires_grad
    assert mean.shape == rstd.shape == (2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("fusion,cl", [("norm+residual", True), ("plain", False)], ids=["norm+residual-cl", "plain"])
def test_opcheck(fusion, cl):
    t = _inputs(2, 4, 6, (2, 3), fusion, cl=cl)
    g = 2 if "norm" in fusion else 0
    args = (t["x"], t["weight"].reshape(6, 4), t["bias"], t["residual"], g, t["gn_weight"], t["gn_bias"], EPS)
    torch.library.opcheck(torch.ops.fastddpm.conv1x1.default,
                          tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args))
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, mean, rstd = torch.ops.fastddpm.conv1x1(*args)
    torch.library.opcheck(torch.ops.fastddpm.conv1x1_backward.default,
                          (torch.randn_like(out), args[0], args[1], mean, rstd, g, args[5], args[6], torch.float32))


def test_compile_fullgraph():
    """The public op (backend switch included) in one graph with the custom op,
    forward and backward (aot_eager on the CPU: inductor's C++ compile is slow here)."""
    seed = fresh_seed()
    t = _inputs(2, 8, 6, (3, 5), "norm+residual")
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, weight, bias, gn_weight, gn_bias, residual):
        with ops.use_backend("triton"):
            out = ops.conv1x1(x * 1.5, weight, bias, norm=(2, gn_weight, gn_bias, EPS), residual=residual)
        return out.square().sum()

    leaves = [t[k].clone().requires_grad_() for k in NAMES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = torch.compile(f, fullgraph=True, backend=record)(*leaves)
    assert len(graphs) == 1 and "fastddpm.conv1x1" in graphs[0].code
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t[k].double().requires_grad_() for k in NAMES]
    x, w, b, gw, gb, r = ref_leaves
    ref = reference.conv1x1_ref(x * 1.5, w, b, (2, gw, gb, EPS), r).square().sum()
    assert_close_rel(loss, ref, torch.float32, f"loss seed {seed}")
    for name, g, r64 in zip(NAMES, grads, torch.autograd.grad(ref, ref_leaves)):
        assert_close_rel(g, r64, torch.float32, f"d{name} seed {seed}", tol=GRAD_TOL[torch.float32])


@pytest.mark.parametrize("case", ["float64", "empty", "bias_float64"] + ([] if HAS_CUDA else ["bf16_on_cpu"]))
def test_triton_backend_falls_back_to_reference(case):
    dtype = {"float64": torch.float64, "bf16_on_cpu": torch.bfloat16}.get(case, torch.float32)
    t = _inputs(0 if case == "empty" else 2, 8, 6, (3, 3), "norm+residual", dtype=dtype)
    if case == "bias_float64":
        t["bias"] = t["bias"].double()
    leaves = {k: v.requires_grad_() for k, v in t.items()}
    with ops.use_backend("triton"):
        out = _call(leaves, 2)
    assert "fastddpm_conv1x1" not in type(out.grad_fn).__name__
    norm = (2, t["gn_weight"], t["gn_bias"], EPS)
    assert torch.equal(out, reference.conv1x1_ref(t["x"], t["weight"], t["bias"], norm, t["residual"]))


def test_autocast_casts_weight_not_normalised_x():
    """Under autocast: weight and bias in the autocast dtype, x normalised as
    given, the output in the autocast dtype (promoted with the residual's), as
    GroupNorm -> autocast conv -> + residual gives unfused."""
    t = _inputs(2, 8, 6, (3, 3), "norm+residual")
    x = t["x"].requires_grad_()
    w = t["weight"].requires_grad_()
    for backend in ("reference", "triton"):      # on the CPU triton runs the reference for bf16 weights
        with torch.autocast(x.device.type, dtype=torch.bfloat16), ops.use_backend(backend):
            plain = ops.conv1x1(x, w, t["bias"])
            fused = ops.conv1x1(x, w, t["bias"], norm=(2, t["gn_weight"], t["gn_bias"], EPS),
                                residual=t["residual"])
        assert plain.dtype == torch.bfloat16 and fused.dtype == torch.float32
        gx, gw = torch.autograd.grad(fused.sum(), (x, w))
        assert gx.dtype == gw.dtype == torch.float32
        ref = reference.conv1x1_ref(x.double(), w.double(), t["bias"].double(),
                                    (2, t["gn_weight"].double(), t["gn_bias"].double(), EPS), t["residual"].double())
        assert_close_rel(fused - t["residual"], ref - t["residual"].double(), torch.bfloat16, backend)


def test_kernel_out_aliasing_an_input_is_refused():
    """out over x (an in-place conv) or over the residual: the autotuner reruns the
    kernel on the first call of a key, each run reading what the last wrote."""
    x = torch.randn(2, 8, 12, device=DEV)
    w = torch.randn(8, 8, device=DEV)
    with pytest.raises(ValueError, match="share memory with x"):
        kconv.conv1x1_fwd(x, w, out=x)
    r = torch.randn(2, 8, 12, device=DEV)
    with pytest.raises(ValueError, match="share memory with residual"):
        kconv.conv1x1_fwd(x, w, residual=r, out=r)


def test_bad_input_errors():
    t = _inputs(2, 6, 4, (3, 3), "norm+residual")
    x, w, b, r = t["x"], t["weight"], t["bias"], t["residual"]
    norm = (3, t["gn_weight"], t["gn_bias"], EPS)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            with pytest.raises(ValueError, match=r"\(N, K, \*spatial\)"):
                ops.conv1x1(x[0, 0, 0], w)
            with pytest.raises(ValueError, match=r"weight must be \(M, 6\)"):
                ops.conv1x1(x, w[:, :5])
            with pytest.raises(ValueError, match="weight must be"):
                ops.conv1x1(x, torch.randn(4, 6, 3, 3, device=DEV))
            with pytest.raises(TypeError, match="float"):
                ops.conv1x1(x.to(torch.int32), w)
            with pytest.raises(TypeError, match="torch.Tensor"):
                ops.conv1x1(x, w.tolist())
            with pytest.raises(ValueError, match="bias must have shape"):
                ops.conv1x1(x, w, b[:3])
            with pytest.raises(ValueError, match="residual must have shape"):
                ops.conv1x1(x, w, b, residual=r[:, :3])
            with pytest.raises(TypeError, match="residual"):
                ops.conv1x1(x, w, b, residual=r.to(torch.int64))
            with pytest.raises(TypeError, match="norm must be"):
                ops.conv1x1(x, w, norm=(3, None, None))
            with pytest.raises(ValueError, match="divisible"):
                ops.conv1x1(x, w, norm=(4, None, None, EPS))
            with pytest.raises(ValueError, match="num_groups"):
                ops.conv1x1(x, w, norm=(True, None, None, EPS))
            with pytest.raises(ValueError, match="eps"):
                ops.conv1x1(x, w, norm=(3, None, None, 0.0))
            with pytest.raises(ValueError, match="weight must have shape"):
                ops.conv1x1(x, w, norm=(3, norm[1][:5], None, EPS))
            if HAS_CUDA:
                with pytest.raises(ValueError, match="is on"):
                    ops.conv1x1(x, w.cpu())
    assert ops.conv1x1(x, w, b, norm=norm, residual=r).shape == r.shape


# ----------------------------------------------------------------------------- AttentionBlock


def _block_fwd_bwd(block, x, backend, dout, fused):
    block.fused_proj = fused     # on this instance; the class default stays off
    return block_fwd_bwd(block, x, backend, dout)


@pytest.mark.parametrize("num_heads,cl", [(1, False), (2, True)], ids=["1head", "2heads-cl"])
def test_attention_block_fused_proj_matches_reference(num_heads, cl):
    """AttentionBlock with fused_proj=True (norm + q/k/v and proj + residual as
    ops.conv1x1) on the triton backend vs the reference backend in float64,
    and vs the unfused block: forward, d x and every parameter gradient."""
    from fastddpm.nn import AttentionBlock
    assert AttentionBlock.fused_proj is False, "the switch must stay off until a GPU has measured it"
    seed = fresh_seed()
    block = randomised_attention_block(16, num_heads, 4)
    keys = set(block.state_dict())
    x = torch.randn(2, 16, 5, 3, device=DEV)                # L = 15
    if cl:
        x = x.to(memory_format=torch.channels_last)
    dout = torch.randn_like(x)
    out, dx, grads, nodes = _block_fwd_bwd(block, x, "triton", dout, fused=True)
    assert out.is_contiguous(memory_format=torch.channels_last) == cl
    assert set(block.state_dict()) == keys
    assert sum("fastddpm_conv1x1" in n for n in nodes) == 2, nodes
    assert any("fastddpm_attention_packed" in n for n in nodes)
    block64 = randomised_attention_block(16, num_heads, 4, dtype=torch.float64)
    block64.load_state_dict(block.state_dict())
    ref, dx64, grads64, _ = _block_fwd_bwd(block64, x.double(), "reference", dout.double(), fused=False)
    plain, dx_plain, grads_plain, _ = _block_fwd_bwd(block, x, "triton", dout, fused=False)
    tol = 1e-5
    # the residual x dominates the output and dx: compare the attention branch
    assert_close_rel(out - x, ref - x.double(), torch.float32, f"block out seed {seed}", tol=tol)
    assert_close_rel(out - x, plain - x, torch.float32, f"fused vs unfused seed {seed}", tol=tol)
    assert_close_rel(dx - dout, dx64 - dout.double(), torch.float32, f"dx seed {seed}", tol=tol)
    for name, g in grads.items():
        assert_close_rel(g, grads64[name], torch.float32, f"d{name} seed {seed}", tol=tol)
        assert_close_rel(g, grads_plain[name], torch.float32, f"d{name} vs unfused seed {seed}", tol=tol)


# ----------------------------------------------------------------------------- sm_90 compile check

_COMPILE_SCRIPT = """
from fastddpm.kernels import conv1x1 as k
from fastddpm.kernels._util import compile_ptx
sig = dict(X="*bf16", W="*bf16", Bias="*fp32", Scale="*fp32", Shift="*fp32", R="*fp32", Out="*fp32")
base = dict(HAS_BIAS=True, DOT_PRECISION="tf32", BLOCK_M=128, BLOCK_L=128, BLOCK_K=64, stride_wk=1)
# (x dtype, X_LEFT, prologue, residual, channels_last): the q/k/v projection with the norm prologue,
# the output projection with the residual, an fp32 x with bf16 weights (autocast), a channels_last x
for x_dtype, x_left, prologue, residual, cl in (("*bf16", True, True, False, False),
                                               ("*bf16", False, False, True, False),
                                               ("*fp32", True, True, False, False),
                                               ("*bf16", False, True, True, True)):
    layout = dict(stride_xk=1) if cl else dict(stride_xl=1, stride_ol=1, stride_rl=1)
    c = dict(base, HAS_PROLOGUE=prologue, HAS_RESIDUAL=residual, X_LEFT=x_left, **layout)
    ptx = compile_ptx(k._conv1x1_fwd_kernel, dict(sig, X=x_dtype), c, num_warps=8, num_stages=3, aligned=True)
    # tensor cores (wgmma) fed by 16-byte asynchronous copies (the software pipeline)
    assert "wgmma.mma_async" in ptx and "cp.async.cg" in ptx, (x_dtype, x_left, prologue, residual, cl)
# fp32 with input_precision="ieee" (no tensor cores) must compile too
c = dict(base, HAS_PROLOGUE=True, HAS_RESIDUAL=True, X_LEFT=True, DOT_PRECISION="ieee", BLOCK_M=64, BLOCK_L=64,
         BLOCK_K=32)
assert "ld.global" in compile_ptx(k._conv1x1_fwd_kernel, dict(sig, X="*fp32", W="*fp32"), c)
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    """The interpreter runs the kernel as numpy: compile it for an H100 (sm_90,
    no GPU needed) with bf16 operands, so that compiler-only errors show up on
    the CPU and the product lands on the tensor cores."""
    run_sm90_compile_check(_COMPILE_SCRIPT)


# ----------------------------------------------------------------------------- GPU, real shapes

B, C, L = 128, 256, 256


def _real(fusion, dtype, cl=False):
    M = 3 * C if "norm" in fusion else C
    t = _inputs(B, C, M, (16, 16), fusion, dtype=dtype, cl=cl, device="cuda")
    return t, (32 if "norm" in fusion else None)


@pytest.mark.gpu
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("fusion", ["norm", "residual"], ids=["qkv+norm", "proj+residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_real_shapes(monkeypatch, dtype, fusion, cl):
    """The AttentionBlock's q/k/v (M=768, K=256, GroupNorm prologue) and output
    (M=K=256, residual) projections at B=128, 16x16, into NaN-poisoned buffers."""
    monkeypatch.setattr(kconv, "POISON", True)
    seed = fresh_seed()
    t, g = _real(fusion, dtype, cl)
    out, _ = _check_against_float64(t, g, dtype, f"seed {seed}")
    assert torch.isfinite(out).all()
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_gpu_fp32_ieee():
    """fp32 end to end (input_precision="ieee" in the kernel, fp32 cuBLAS in the
    backward): sums of K = 256 and N * L = 4096 products stay well under 1e-5."""
    seed = fresh_seed()
    t = _inputs(16, C, 3 * C, (16, 16), "norm+residual", device="cuda")
    _check_against_float64(t, 32, torch.float32, f"seed {seed}", tol=1e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph():
    """fwd + bwd (both fusions) captured in a CUDA graph, replayed on new inputs."""
    t, _ = _real("norm+residual", torch.bfloat16)
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    dout = torch.randn_like(t["residual"])

    def step():
        with ops.use_backend("triton"):
            out = _call(leaves, 32)
        return (out, *torch.autograd.grad(out, list(leaves.values()), dout))

    graph, outs = capture_cuda_graph(step, warmup=3)
    for _ in range(2):
        seed = fresh_seed()
        with torch.no_grad():
            for v in leaves.values():
                v.copy_(torch.randn_like(v))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        # cuBLAS (the backward's matmuls) may pick other algorithms inside a capture: not bitwise
        for name, o, e in zip(("out",) + tuple(leaves), outs, eager):
            assert_close_rel(o, e, torch.bfloat16, f"graph replay vs eager: {name}, seed {seed}")
        assert torch.equal(outs[0], eager[0]), f"the forward is all Triton: bitwise, seed {seed}"


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    """inductor, fullgraph: the op between pointwise ops, bf16, the real qkv shape."""
    seed = fresh_seed()
    t, _ = _real("norm", torch.bfloat16)
    leaves = [t[k].clone().requires_grad_() for k in ("x", "weight", "bias", "gn_weight", "gn_bias")]

    def f(x, weight, bias, gn_weight, gn_bias):
        with ops.use_backend("triton"):
            return ops.conv1x1(x * 1.5, weight, bias, norm=(32, gn_weight, gn_bias, EPS)).float().square().mean()

    loss = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    x, w, b, gw, gb = ref_leaves
    ref = reference.conv1x1_ref(x * 1.5, w, b, (32, gw, gb, EPS)).square().mean()
    assert_close_rel(loss, ref, torch.bfloat16, f"loss seed {seed}")
    for g, r in zip(grads, torch.autograd.grad(ref, ref_leaves)):
        assert_close_rel(g, r, torch.bfloat16, f"grad seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_gpu_attention_block_fused_proj_autocast(cl):
    """AttentionBlock(256) with fused_proj under bf16 autocast vs the reference
    block in float64: forward, d x and every parameter gradient."""
    seed = fresh_seed()
    block = randomised_attention_block(256, 1, 32, device="cuda")
    block64 = randomised_attention_block(256, 1, 32, dtype=torch.float64, device="cuda")
    block64.load_state_dict(block.state_dict())
    x = torch.randn(16, 256, 16, 16, device="cuda")
    if cl:
        x = x.to(memory_format=torch.channels_last)
    dout = torch.randn_like(x)
    ref, dx64, grads64, _ = _block_fwd_bwd(block64, x.double(), "reference", dout.double(), fused=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, dx, grads, nodes = _block_fwd_bwd(block, x, "triton", dout, fused=True)
    assert sum("fastddpm_conv1x1" in n for n in nodes) == 2, nodes
    assert out.dtype == torch.float32
    assert_close_rel(out - x, ref - x.double(), torch.bfloat16, f"block seed {seed}")
    assert_close_rel(dx - dout, dx64 - dout.double(), torch.bfloat16, f"dx seed {seed}")
    for name, g in grads.items():
        assert_close_rel(g, grads64[name], torch.bfloat16, f"d{name} seed {seed}")


assert set(GRAD_TOL) <= set(REL_TOL)
