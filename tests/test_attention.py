"""ops.attention and its Triton flash-attention kernels against a float64 reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by the root conftest)
at small fp32 and fp16 shapes (the interpreter multiplies fp16 exactly; it has no
bf16 tl.dot); the `gpu` tests run the real shapes in bf16/fp16, inside
a CUDA graph and under torch.compile(fullgraph=True).
"""
import math

import pytest
import torch

import fastddpm.ops as ops
from fastddpm import reference
from fastddpm.kernels import attention as attention_kernels
from fastddpm.ops.attention import attention_packed_ref, attention_triton
from _util import HAS_CUDA, REL_TOL, assert_close_rel, capture_cuda_graph, expect_ran, rel_err
from _util import backward_node_names as _backward_nodes
from _util import block_fwd_bwd as _block_fwd_bwd
from _util import fresh_seed as _seed
from _util import randomised_attention_block as _randomised_block

DEV = "cuda" if HAS_CUDA else "cpu"


def _tol(dtype, grad=False):
    """REL_TOL, except fp32 gradients: dS = P * (dP - delta) cancels, and plain
    fp32 torch autograd itself lands at 4-6e-7 from float64 at d = 512, too
    near REL_TOL's 1e-6 for fresh random inputs; 3e-6 is still well under 1e-5."""
    return 3e-6 if grad and dtype == torch.float32 else REL_TOL[dtype]

# (B, heads, L, d) at small sizes: odd L that straddle the 16-row interpreter
# blocks, L smaller than a block, non-power-of-two d, d < 16, the largest d.
SMALL_SHAPES = [
    (1, 1, 49, 16),
    (1, 1, 100, 16),
    (2, 3, 17, 32),
    (1, 2, 33, 96),
    (1, 1, 5, 8),
    (1, 1, 1, 24),
    (1, 1, 20, 512),
]


def _inputs(shape, dtype, device=DEV, requires_grad=False):
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(3)]


def _ref64(q, k, v, do):
    """Float64 o, lse and (dq, dk, dv) for the grad `do` of o."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    o = torch.softmax(s, dim=-1) @ v
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.double())
    return o.detach(), torch.logsumexp(s, dim=-1).detach(), dq, dk, dv


def _nan_like(x, dtype=None):
    return torch.full_like(x, float("nan"), dtype=dtype)


def _check_kernels(q, k, v, do, seed, out_layout=None, tol=None):
    """Launch the kernels into NaN-poisoned buffers and compare everything
    (o, lse, dq, dk, dv and delta) with float64."""
    B, H, L, D = q.shape
    make = out_layout or (lambda t: _nan_like(t))
    o, dq, dk, dv = make(q), make(q), make(k), make(v)
    for t in (o, dq, dk, dv):
        t.fill_(float("nan"))
    lse = torch.full((B, H, L), float("nan"), device=q.device)
    delta = torch.full((B, H, L), float("nan"), device=q.device)
    o_, lse_ = attention_kernels.attention_fwd(q, k, v, 1.0 / math.sqrt(D), o=o, lse=lse)
    assert o_ is o and lse_ is lse
    res = attention_kernels.attention_bwd(do, q, k, v, o, lse, 1.0 / math.sqrt(D), dq=dq, dk=dk, dv=dv,
                                          delta=delta)
    assert all(a is b for a, b in zip(res, (dq, dk, dv)))
    o64, lse64, dq64, dk64, dv64 = _ref64(q, k, v, do)
    delta64 = (do.double() * o.double()).sum(-1)
    for name, out, ref in (("o", o, o64), ("lse", lse, lse64), ("dq", dq, dq64), ("dk", dk, dk64),
                           ("dv", dv, dv64), ("delta", delta, delta64)):
        assert torch.isfinite(out).all(), f"{name}: unwritten (NaN) elements, shape {tuple(q.shape)}, seed {seed}"
        if L == 1 and name in ("dq", "dk"):  # one key: softmax is constant, dq = dk = 0
            assert out.abs().max() < 1e-6, f"{name} must vanish for L == 1, seed {seed}"
            continue
        if name == "lse":  # a row's lse may sit near 0: bound the error by tol * (1 + |lse|)
            err = ((out.double() - ref).abs() / (1 + ref.abs())).max().item()
            t = tol or REL_TOL[q.dtype]
            assert err < t, f"lse {tuple(q.shape)} seed {seed}: error {err:.3e} >= {t:.1e}"
            continue
        t = tol or _tol(q.dtype, grad=name in ("dq", "dk", "dv"))
        assert_close_rel(out, ref, q.dtype, f"{name} {tuple(q.shape)} seed {seed}", tol=t)


# --------------------------------------------------------------------------
# CPU (interpreter) / any device: fp32 kernels
# --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_fp32_match_float64(shape):
    seed = _seed()
    q, k, v = _inputs(shape, torch.float32)
    do = torch.randn(shape, device=DEV)
    _check_kernels(q, k, v, do, seed)


@pytest.mark.parametrize("shape", [(1, 1, 49, 16), (2, 3, 17, 32)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_fp16_match_float64(shape):
    """fp16 in, fp32 accumulation: o, lse, dq, dk, dv within fp16's tolerance (on the
    CPU too: the interpreter's fp16 tl.dot is exact)."""
    seed = _seed()
    q, k, v = _inputs(shape, torch.float16)
    do = torch.randn(shape, device=DEV).to(torch.float16)
    _check_kernels(q, k, v, do, seed)


def test_op_fp16_qkv_view_autograd():
    """test_gpu_op_qkv_view_autograd's fp16 case at a size the interpreter runs: q,
    k, v viewed out of a (B, 3C, L) tensor, through ops.attention and autograd."""
    seed = _seed()
    B, C, L = 2, 32, 20
    qkv = torch.randn(B, 3 * C, L, device=DEV, dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.reshape(B, 3, 1, C, L).transpose(-1, -2).unbind(1)
    do = torch.randn(B, 1, L, C, device=DEV).to(torch.float16)
    with ops.use_backend("triton"), expect_ran("fastddpm::attention", "fastddpm::attention_backward"):
        o = ops.attention(q, k, v)
        (g,) = torch.autograd.grad(o, qkv, do)
    q64 = qkv.detach().double().requires_grad_()
    o64 = reference.attention_ref(*q64.reshape(B, 3, 1, C, L).transpose(-1, -2).unbind(1))
    (g64,) = torch.autograd.grad(o64, q64, do.double())
    assert o.dtype == g.dtype == torch.float16
    assert_close_rel(o, o64, torch.float16, f"o seed {seed}")
    assert_close_rel(g, g64, torch.float16, f"dqkv seed {seed}")


def test_kernels_noncontiguous_inputs_and_outputs():
    """q, k, v as views of a (B, 3C, L) conv output (L-contiguous, as the
    AttentionBlock hands them over), dO transposed, outputs into strided views."""
    seed = _seed()
    B, H, L, d = 2, 2, 23, 24
    qkv = torch.randn(B, 3 * H * d, L, device=DEV)
    q, k, v = qkv.reshape(B, 3, H, d, L).transpose(-1, -2).unbind(1)
    assert q.stride(-2) == 1 and not q.is_contiguous()
    do = torch.randn(B, H, d, L, device=DEV).transpose(-1, -2)

    def strided_out(t):  # every other row of a bigger buffer
        return torch.empty(B, H, 2 * L, d, device=DEV)[:, :, ::2]

    _check_kernels(q, k, v, do, seed, out_layout=strided_out)
    # new outputs follow the inputs' layout, so (B, H, L, d) -> (B, C, L) is a view
    o, _ = attention_kernels.attention_fwd(q, k, v)
    assert o.stride(-2) == 1 and o.transpose(-1, -2).is_contiguous()
    dq, dk, dv = attention_kernels.attention_bwd(do, q, k, v, o, _)
    assert all(t.stride(-2) == 1 for t in (dq, dk, dv))


def test_kernels_input_precision_option():
    seed = _seed()
    q, k, v = _inputs((1, 1, 20, 16), torch.float32)
    o, _ = attention_kernels.attention_fwd(q, k, v, input_precision="ieee")
    assert_close_rel(o, _ref64(q, k, v, torch.ones_like(q))[0], torch.float32, f"o seed {seed}")
    with pytest.raises(ValueError, match="input_precision"):
        attention_kernels.attention_fwd(q, k, v, input_precision="bf16x3")


def test_kernels_custom_scale():
    seed = _seed()
    q, k, v = _inputs((1, 2, 19, 16), torch.float32)
    o, lse = attention_kernels.attention_fwd(q, k, v, scale=0.37)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.37
    assert_close_rel(o, torch.softmax(s, -1) @ v.double(), torch.float32, f"o seed {seed}")
    assert_close_rel(lse, torch.logsumexp(s, -1), torch.float32, f"lse seed {seed}")


# --------------------------------------------------------------------------
# the op: ops.attention with the triton backend, autograd, opcheck, compile
# --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 2, 49, 16), (1, 1, 100, 16), (1, 3, 10, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_op_forward_backward_fp32(shape):
    seed = _seed()
    q, k, v = _inputs(shape, torch.float32, requires_grad=True)
    with ops.use_backend("triton"):
        o = ops.attention(q, k, v)
    assert "fastddpm_attention" in type(o.grad_fn).__name__, "the triton backend did not run the kernel"
    do = torch.randn_like(o)
    o.backward(do)
    o64, _, dq64, dk64, dv64 = _ref64(q, k, v, do)
    for name, out, ref in (("o", o, o64), ("dq", q.grad, dq64), ("dk", k.grad, dk64), ("dv", v.grad, dv64)):
        assert_close_rel(out, ref, torch.float32, f"{name} {shape} seed {seed}",
                         tol=_tol(torch.float32, grad=name != "o"))


def test_op_matches_reference_backend():
    _seed()
    q, k, v = _inputs((2, 1, 36, 32), torch.float32)
    with ops.use_backend("triton"):
        o = ops.attention(q, k, v)
    with ops.use_backend("reference"):
        r = ops.attention(q, k, v)
    assert rel_err(o, r) < REL_TOL[torch.float32]


def test_op_lse_is_not_differentiable():
    q, k, v = _inputs((1, 1, 8, 16), torch.float32, requires_grad=True)
    o, lse = torch.ops.fastddpm.attention(q, k, v, 0.25)
    assert o.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("layout", ["contiguous", "qkv_view"])
def test_opcheck(layout):
    _seed()
    if layout == "contiguous":
        q, k, v = _inputs((1, 2, 20, 16), torch.float32)
    else:
        qkv = torch.randn(1, 3 * 2 * 16, 20, device=DEV)
        q, k, v = (t.clone(memory_format=torch.preserve_format)
                   for t in qkv.reshape(1, 3, 2, 16, 20).transpose(-1, -2).unbind(1))
        assert q.stride(-2) == 1
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastddpm.attention.default, (q, k, v, 0.25))
    o, lse = torch.ops.fastddpm.attention(q, k, v, 0.25)
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.fastddpm.attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, 0.25))


def test_compile_fullgraph_triton_fn():
    """The triton backend's function traces into one graph (aot_eager on the
    CPU: inductor's C++ compile costs too long here; the gpu test uses inductor)."""
    seed = _seed()
    q, k, v = _inputs((1, 2, 20, 16), torch.float32, requires_grad=True)
    f = torch.compile(lambda q, k, v: attention_triton(q, k, v).square().sum(), fullgraph=True,
                      backend="aot_eager")
    loss = f(q, k, v)
    loss.backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention_ref(qd, kd, vd).square().sum()
    ref.backward()
    assert_close_rel(loss, ref, torch.float32, f"loss seed {seed}")
    for name, g, r in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        assert_close_rel(g, r, torch.float32, f"{name} seed {seed}", tol=_tol(torch.float32, grad=True))


def test_compile_fullgraph_ops_attention():
    """The public op, backend switch included, compiles to one graph and runs the kernel."""
    seed = _seed()
    q, k, v = _inputs((1, 1, 16, 16), torch.float32, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(ops.attention, fullgraph=True, backend=record)
    with ops.use_backend("triton"):
        o = f(q, k, v)
    assert len(graphs) == 1 and "fastddpm.attention" in graphs[0].code
    assert rel_err(o, reference.attention_ref(q, k, v)) < REL_TOL[torch.float32], f"seed {seed}"
    (dq,) = torch.autograd.grad(o.square().sum(), q)
    (ref,) = torch.autograd.grad(reference.attention_ref(q, k, v).square().sum(), q)
    assert rel_err(dq, ref) < _tol(torch.float32, grad=True), f"seed {seed}"


# --------------------------------------------------------------------------
# fallbacks and bad input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["float64", "d_over_512", "empty"] + ([] if HAS_CUDA else ["bf16_on_cpu"]))
def test_triton_backend_falls_back_to_reference(case):
    shape, dtype = {"float64": ((1, 1, 9, 16), torch.float64), "d_over_512": ((1, 1, 3, 520), torch.float32),
                    "empty": ((0, 1, 9, 16), torch.float32), "bf16_on_cpu": ((1, 1, 9, 16), torch.bfloat16)}[case]
    q, k, v = _inputs(shape, dtype, requires_grad=True)
    with ops.use_backend("triton"):
        o = ops.attention(q, k, v)
    assert "fastddpm_attention" not in type(o.grad_fn).__name__
    assert torch.equal(o, reference.attention_ref(q, k, v))


def test_bad_input_errors():
    q, k, v = _inputs((1, 1, 8, 16), torch.float32)
    with ops.use_backend("triton"):
        with pytest.raises(ValueError, match="B, heads, L, d"):
            ops.attention(q[0], k[0], v[0])
        with pytest.raises(ValueError, match="shape"):
            ops.attention(q, k[:, :, :4], v)
        with pytest.raises(TypeError, match="dtype"):
            ops.attention(q, k.double(), v)
        with pytest.raises(TypeError):
            ops.attention(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(ValueError, match="head dimension"):
        big = torch.randn(1, 1, 2, 600, device=DEV)
        attention_kernels.attention_fwd(big, big, big)
    with pytest.raises(TypeError, match="not supported"):
        attention_kernels.attention_fwd(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="shape"):
        attention_kernels.attention_fwd(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="o must be"):
        attention_kernels.attention_fwd(q, k, v, o=torch.empty(1, 1, 8, 8, device=DEV))
    with pytest.raises(ValueError, match="lse must be"):
        attention_kernels.attention_fwd(q, k, v, lse=torch.empty(1, 1, 8, device=DEV, dtype=torch.float64))
    o, lse = attention_kernels.attention_fwd(q, k, v)
    with pytest.raises(ValueError, match="lse must be"):
        attention_kernels.attention_bwd(o, q, k, v, o, lse[..., :4])


def test_zero_head_dim_is_a_value_error():
    """d = 0 has no softmax scale (1/sqrt(d)): a one-line ValueError, not ZeroDivisionError."""
    q = torch.randn(1, 2, 8, 0, device=DEV)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            with pytest.raises(ValueError, match="head dimension"):
                ops.attention(q, q, q)
            with pytest.raises(ValueError, match="channels"):
                ops.attention_packed(torch.randn(1, 0, 8, device=DEV), 1)


def test_kernel_outputs_aliasing_inputs_are_refused():
    """attention_fwd(o=q) and gradients written over inputs: the autotuner reruns
    the kernels on the first call of a key, so a run that overwrote q fed the
    next one wrong data. Refused."""
    q, k, v = _inputs((1, 2, 20, 16), torch.float32)
    for name, o in (("q", q), ("v", v)):
        with pytest.raises(ValueError, match=f"o must not share memory with {name}"):
            attention_kernels.attention_fwd(q, k, v, o=o)
    o, lse = attention_kernels.attention_fwd(q, k, v)
    with pytest.raises(ValueError, match="dq must not share memory with q"):
        attention_kernels.attention_bwd(torch.randn_like(o), q, k, v, o, lse, dq=q)
    with pytest.raises(ValueError, match="dv must not share memory with do"):
        do = torch.randn_like(o)
        attention_kernels.attention_bwd(do, q, k, v, o, lse, dv=do)


@pytest.mark.parametrize("scaled", ["q", "q_and_k"])
def test_kernel_backward_large_logits(scaled):
    """|q.k| from 1 to 1e8 (issue 10 item 9). The backward used to recompute P
    from the saved lse, whose rounding (ulps of |q.k|) gave dq/dk errors of 1e-3
    .. inf where rows saturate to one key and the true dq, dk are ~0. Now: where
    the float64 softmax of a row is one-hot, its dq is exactly what plain fp32
    torch gives (~0), and dk too when every row is; elsewhere the error stays at
    fp32 resolution of the gradient's terms (|dS| <= 2 |do| |v|, times scale |k|
    for dq, scale |q| for dk) or within 8x of fp32 torch autograd's."""
    _check_large_logits(scaled, (1, 2, 40, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("scaled", ["q", "q_and_k"])
def test_gpu_kernel_backward_large_logits(scaled):
    """The same on the GPU (fp32 "ieee"), where autotuned tiles differ between the
    three kernels: their scores must still agree bit for bit."""
    _check_large_logits(scaled, (2, 2, 256, 64))


def _check_large_logits(scaled, shape):
    seed = _seed()
    B, H, L, D = shape
    scale = 1.0 / math.sqrt(D)
    for mag in (1e0, 1e2, 1e4, 1e6, 1e8):
        q, k, v = _inputs((B, H, L, D), torch.float32)
        do = torch.randn_like(q)
        if scaled == "q":
            q = q * (mag / math.sqrt(D) ** 0.5)
        else:
            q, k = q * mag ** 0.5, k * mag ** 0.5
        o, lse = attention_kernels.attention_fwd(q, k, v)
        dq, dk, dv = attention_kernels.attention_bwd(do, q, k, v, o, lse)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o32 = reference.attention_ref(*leaves)
        o32.backward(do)
        ref = _ref64(q, k, v, do)
        top2 = (q.double() @ k.double().transpose(-1, -2) * scale).topk(2, dim=-1).values
        one_hot = top2[..., 0] - top2[..., 1] > 150          # (B, H, L) rows whose other p underflow in fp32
        rows = lambda t: t.double().norm(dim=-1).max().item()  # noqa: E731
        terms = 2 * scale * rows(do) * rows(v) * 2.4e-7                         # 4 ulps of fp32
        for name, got, r32, r64, fp32_res in zip(
                ("o", "dq", "dk", "dv"), (o, dq, dk, dv), (o32.detach(), *(t.grad for t in leaves)),
                (ref[0], *ref[2:]), (0.0, terms * rows(k), terms * rows(q), 0.0)):
            err = (got.double() - r64).abs().max().item()
            err32 = (r32.double() - r64).abs().max().item()
            bound = max(8 * err32, fp32_res) + 1e-6 * r64.abs().max().item() + 1e-30
            assert err <= bound, (f"{name} at |q.k| ~ {mag:.0e}: max error {err:.3e}, fp32 torch {err32:.3e} "
                                  f"(seed {seed})")
        exact = [("dq", dq[one_hot], leaves[0].grad[one_hot])]
        if one_hot.all():
            exact.append(("dk", dk, leaves[1].grad))
        for name, got, r32 in exact:
            if not got.numel():
                continue
            err = (got - r32).abs().max().item()
            assert err <= 1e-6 * r32.abs().max().item() + 1e-30, \
                f"{name} of one-hot rows at |q.k| ~ {mag:.0e}: error {err:.3e} from fp32 torch (seed {seed})"


# --------------------------------------------------------------------------
# the packed op: ops.attention_packed(qkv (B, 3C, L), heads) -> (B, C, L)
# --------------------------------------------------------------------------
def _packed_ref64(qkv, num_heads, dout):
    """Float64 out (B, C, L), lse (B, heads, L) and d qkv for the grad `dout`
    of out, written independently of the op's own head split."""
    x = qkv.detach().double().requires_grad_()
    B, C3, L = x.shape
    C = C3 // 3
    d = C // num_heads
    q, k, v = x.reshape(B, 3, num_heads, d, L).unbind(1)            # (B, heads, d, L)
    s = (q.transpose(-1, -2) @ k) / math.sqrt(d)                      # (B, heads, Lq, Lk)
    o = (v @ torch.softmax(s, dim=-1).transpose(-1, -2)).reshape(B, C, L)
    (g,) = torch.autograd.grad(o, x, dout.double())
    return o.detach(), torch.logsumexp(s, dim=-1).detach(), g


def _check_packed(qkv, num_heads, seed, dout=None):
    """ops.attention_packed on the triton backend: the op runs, out and d qkv
    match float64; returns (out, dqkv)."""
    qkv = qkv.detach().requires_grad_()
    B, C3, L = qkv.shape
    dout = torch.randn(B, C3 // 3, L, device=qkv.device).to(qkv.dtype) if dout is None else dout
    with ops.use_backend("triton"), expect_ran("fastddpm::attention_packed", "fastddpm::attention_packed_backward"):
        out = ops.attention_packed(qkv, num_heads)
        (g,) = torch.autograd.grad(out, qkv, dout)
    assert out.shape == (B, C3 // 3, L)
    o64, _, g64 = _packed_ref64(qkv, num_heads, dout)
    assert_close_rel(out, o64, qkv.dtype, f"out {tuple(qkv.shape)} heads {num_heads} seed {seed}")
    assert_close_rel(g, g64, qkv.dtype, f"dqkv {tuple(qkv.shape)} heads {num_heads} seed {seed}",
                     tol=_tol(qkv.dtype, grad=True))
    return out, g


# (B, heads, d, L): odd L over several 16-row interpreter blocks, multi-head, L < one block
PACKED_SHAPES = [(2, 1, 16, 49), (1, 3, 8, 20), (2, 2, 24, 7)]


@pytest.mark.parametrize("shape", PACKED_SHAPES, ids=lambda s: "B{}h{}d{}L{}".format(*s))
def test_packed_op_forward_backward_fp32(shape):
    seed = _seed()
    B, nh, d, L = shape
    qkv = torch.randn(B, 3 * nh * d, L, device=DEV)
    out, g = _check_packed(qkv, nh, seed)
    # channel-major output (the proj conv's reshape to (B, C, H, W) is a view), one
    # gradient buffer laid out like qkv
    assert out.is_contiguous() and g.is_contiguous()


def test_packed_op_forward_backward_fp16():
    """The AttentionBlock's op in fp16 (autocast's dtype), two heads, on the CPU too."""
    seed = _seed()
    qkv = torch.randn(2, 3 * 2 * 16, 20, device=DEV).to(torch.float16)
    out, g = _check_packed(qkv, 2, seed)
    assert out.dtype == g.dtype == torch.float16


@pytest.mark.parametrize("layout", ["channels_last", "strided_L", "channel_slice"])
def test_packed_op_noncontiguous_qkv(layout):
    """qkv as a channels_last conv output ((B, L, 3C) memory), every other
    position of a longer buffer, and every other channel of a wider one."""
    seed = _seed()
    B, nh, d, L = 2, 2, 8, 19
    C3 = 3 * nh * d
    if layout == "channels_last":
        qkv = torch.randn(B, L, C3, device=DEV).transpose(1, 2)
    elif layout == "strided_L":
        qkv = torch.randn(B, C3, 2 * L, device=DEV)[:, :, ::2]
    else:
        qkv = torch.randn(B, 2 * C3, L, device=DEV)[:, ::2]
    assert not qkv.is_contiguous()
    out, g = _check_packed(qkv, nh, seed, dout=torch.randn(B, L, C3 // 3, device=DEV).transpose(1, 2))
    if layout == "channels_last":  # the output and the gradient keep the channel-fastest layout
        assert out.stride() == (L * C3 // 3, 1, C3 // 3) and g.stride() == qkv.stride()
    else:
        assert out.is_contiguous()


def test_packed_op_matches_unpacked_op():
    """Same kernels, same strides: the packed op equals ops.attention on the q,
    k, v views of qkv (and autograd's sum of their three gradients) exactly."""
    _seed()
    B, nh, d, L = 1, 2, 16, 21
    qkv = torch.randn(B, 3 * nh * d, L, device=DEV, requires_grad=True)
    dout = torch.randn(B, nh * d, L, device=DEV)
    with ops.use_backend("triton"):
        out = ops.attention_packed(qkv, nh)
        q, k, v = qkv.reshape(B, 3, nh, d, L).transpose(-1, -2).unbind(1)
        o = ops.attention(q, k, v).transpose(-1, -2).reshape(B, nh * d, L)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (g_views,) = torch.autograd.grad(o, qkv, dout)
    assert torch.equal(out, o) and torch.equal(g, g_views)


def test_packed_op_one_poisoned_gradient_buffer(monkeypatch):
    """Under the kernels' POISON hook every buffer (out, lse, delta and the one
    dqkv) starts as NaN: all must come back finite. The backward hands the three
    views of ONE NaN-filled (B, 3C, L) buffer to attention_bwd as dq, dk, dv."""
    monkeypatch.setattr(attention_kernels, "POISON", True)
    seed = _seed()
    B, nh, d, L = 2, 2, 8, 33
    qkv = torch.randn(B, 3 * nh * d, L, device=DEV)
    calls = []
    real_bwd = attention_kernels.attention_bwd

    def spy(do, q, k, v, o, lse, scale=None, dq=None, dk=None, dv=None, **kw):
        calls.append({"nan_before": all(torch.isnan(t).all().item() for t in (dq, dk, dv)),
                      "storages": {t.untyped_storage().data_ptr() for t in (dq, dk, dv)},
                      "ptrs": [t.data_ptr() for t in (dq, dk, dv)]})
        return real_bwd(do, q, k, v, o, lse, scale, dq=dq, dk=dk, dv=dv, **kw)

    monkeypatch.setattr(attention_kernels, "attention_bwd", spy)
    scale = 1.0 / math.sqrt(d)
    out, lse = torch.ops.fastddpm.attention_packed(qkv, nh, scale)
    dout = torch.randn_like(out)
    dqkv = torch.ops.fastddpm.attention_packed_backward(dout, qkv, out, lse, nh, scale)
    assert len(calls) == 1 and calls[0]["nan_before"], "dq, dk, dv were not NaN-poisoned before the kernels"
    assert calls[0]["storages"] == {dqkv.untyped_storage().data_ptr()}, "dq, dk, dv are not views of one buffer"
    C = nh * d
    assert calls[0]["ptrs"] == [dqkv.data_ptr() + i * C * dqkv.stride(1) * dqkv.element_size() for i in range(3)]
    assert dqkv.shape == qkv.shape and dqkv.stride() == qkv.stride()
    o64, lse64, g64 = _packed_ref64(qkv, nh, dout)
    for name, t in (("out", out), ("lse", lse), ("dqkv", dqkv)):
        assert torch.isfinite(t).all(), f"{name}: unwritten (NaN) elements, seed {seed}"
    assert_close_rel(out, o64, torch.float32, f"out seed {seed}")
    assert_close_rel(lse, lse64, torch.float32, f"lse seed {seed}")
    assert_close_rel(dqkv, g64, torch.float32, f"dqkv seed {seed}", tol=_tol(torch.float32, grad=True))


def test_packed_op_lse_is_not_differentiable():
    qkv = torch.randn(1, 3 * 16, 8, device=DEV, requires_grad=True)
    out, lse = torch.ops.fastddpm.attention_packed(qkv, 1, 0.25)
    assert out.requires_grad and not lse.requires_grad
    assert lse.shape == (1, 1, 8) and lse.dtype == torch.float32


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_packed_opcheck(layout):
    _seed()
    B, nh, d, L = 1, 2, 8, 12
    if layout == "contiguous":
        qkv = torch.randn(B, 3 * nh * d, L, device=DEV)
    else:
        qkv = torch.randn(B, L, 3 * nh * d, device=DEV).transpose(1, 2)
    qkv.requires_grad_()
    torch.library.opcheck(torch.ops.fastddpm.attention_packed.default, (qkv, nh, 0.3))
    out, lse = torch.ops.fastddpm.attention_packed(qkv, nh, 0.3)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastddpm.attention_packed_backward.default,
                          (dout, qkv.detach(), out.detach(), lse, nh, 0.3))


def test_packed_compile_fullgraph():
    """ops.attention_packed, backend switch and input checks included, traces
    into one graph with the custom op in it; forward and backward through AOT
    autograd (aot_eager: the fakes of both ops) match float64."""
    seed = _seed()
    B, nh, d, L = 2, 2, 8, 10
    qkv = torch.randn(B, 3 * nh * d, L, device=DEV, requires_grad=True)
    # a loss without cancellation (squares, positive weights): a random-sign sum can be
    # near zero, and its relative error then says nothing about the op (it failed so)
    w = torch.rand(B, nh * d, L, device=DEV) + 0.5
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def f(qkv):
        with ops.use_backend("triton"):
            return (ops.attention_packed(qkv * 1.5, nh).square() * w).sum()

    loss = torch.compile(f, fullgraph=True, backend=record)(qkv)
    loss.backward()
    assert len(graphs) == 1 and "fastddpm.attention_packed" in graphs[0].code
    x = qkv.detach().double().requires_grad_()
    ref = (attention_packed_ref(x * 1.5, nh).square() * w.double()).sum()
    ref.backward()
    assert_close_rel(loss, ref, torch.float32, f"loss seed {seed}")
    assert_close_rel(qkv.grad, x.grad, torch.float32, f"dqkv seed {seed}", tol=_tol(torch.float32, grad=True))


@pytest.mark.parametrize("case", ["float64", "d_over_512", "empty_batch", "empty_L"]
                         + ([] if HAS_CUDA else ["bf16_on_cpu"]))
def test_packed_triton_backend_falls_back_to_reference(case):
    (B, C3, L), nh, dtype = {"float64": ((1, 48, 9), 1, torch.float64),
                             "d_over_512": ((1, 3 * 520, 3), 1, torch.float32),
                             "empty_batch": ((0, 48, 9), 2, torch.float32),
                             "empty_L": ((2, 48, 0), 2, torch.float32),
                             "bf16_on_cpu": ((1, 48, 9), 1, torch.bfloat16)}[case]
    qkv = torch.randn(B, C3, L, dtype=dtype, device=DEV, requires_grad=True)
    with ops.use_backend("triton"):
        out = ops.attention_packed(qkv, nh)
    assert "fastddpm_attention_packed" not in " ".join(_backward_nodes(out))
    assert out.shape == (B, C3 // 3, L)
    assert torch.equal(out, attention_packed_ref(qkv, nh))


def test_packed_reference_backend():
    """The reference backend is attention_ref on the q, k, v views."""
    seed = _seed()
    qkv = torch.randn(2, 3 * 12, 11, dtype=torch.float64, device=DEV)
    with ops.use_backend("reference"):
        out = ops.attention_packed(qkv, 3)
    o64, _, _ = _packed_ref64(qkv, 3, torch.zeros(2, 12, 11))
    assert_close_rel(out, o64, torch.float64, f"seed {seed}")


def test_packed_bad_input_errors():
    qkv = torch.randn(1, 48, 8, device=DEV)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            with pytest.raises(ValueError, match=r"\(B, 3\*C, L\)"):
                ops.attention_packed(qkv[0], 1)
            with pytest.raises(ValueError, match=r"\(B, 3\*C, L\)"):
                ops.attention_packed(qkv[None], 1)
            with pytest.raises(TypeError, match="float"):
                ops.attention_packed(qkv.to(torch.int32), 1)
            with pytest.raises(TypeError, match="torch.Tensor"):
                ops.attention_packed(qkv.tolist(), 1)
            for bad in (1.0, True, "2", None):
                with pytest.raises(TypeError, match="num_heads must be an int"):
                    ops.attention_packed(qkv, bad)
            for bad in (0, -1):
                with pytest.raises(ValueError, match="num_heads must be positive"):
                    ops.attention_packed(qkv, bad)
            with pytest.raises(ValueError, match="multiple of 3 \\* num_heads = 15"):
                ops.attention_packed(qkv, 5)                 # 48 channels: 3 * 5 heads do not divide them
            with pytest.raises(ValueError, match="multiple of"):
                ops.attention_packed(torch.randn(1, 20, 8, device=DEV), 1)
            with pytest.raises(ValueError, match="positive multiple"):
                ops.attention_packed(torch.randn(1, 0, 8, device=DEV), 1)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_block_triton_matches_reference_cpu(num_heads):
    """fastddpm.nn.AttentionBlock on the triton backend (the packed op, one
    gradient buffer) vs the reference backend in float64: forward, d x and
    every parameter gradient. Parameters and state_dict keys are unchanged."""
    seed = _seed()
    block = _randomised_block(16, num_heads, num_groups=4)
    assert set(block.state_dict()) == {f"{m}.{p}" for m in ("norm", "qkv", "proj") for p in ("weight", "bias")}
    x = torch.randn(2, 16, 5, 3, device=DEV)                 # L = 15: one partial block
    dout = torch.randn_like(x)
    out, dx, grads, nodes = _block_fwd_bwd(block, x, "triton", dout)
    assert any("fastddpm_attention_packed" in n for n in nodes), "the block did not run the packed op"
    assert not any(n.startswith("Select") or n.startswith("Unbind") for n in nodes), nodes
    block64 = _randomised_block(16, num_heads, num_groups=4, dtype=torch.float64)
    block64.load_state_dict(block.state_dict())
    ref, dx64, grads64, _ = _block_fwd_bwd(block64, x.double(), "reference", dout.double())
    tol = 1e-5
    # the residual x dominates the output and dx: compare the attention branch
    assert_close_rel(out - x, ref - x.double(), torch.float32, f"block out seed {seed}", tol=tol)
    assert_close_rel(dx - dout, dx64 - dout.double(), torch.float32, f"dx seed {seed}", tol=tol)
    for name, g in grads.items():
        assert_close_rel(g, grads64[name], torch.float32, f"d{name} seed {seed}", tol=tol)


# --------------------------------------------------------------------------
# GPU: real shapes and dtypes
# --------------------------------------------------------------------------
# (B, heads, L, d): the UNet's 16x16 attention at C=256, 8x8 at C=512, 32x32
# at C=256, multi-head splits, and odd sizes.
GPU_SHAPES = [
    (128, 1, 256, 256),
    (64, 1, 64, 512),
    (8, 1, 1024, 256),
    (16, 4, 256, 64),
    (8, 8, 256, 32),
    (4, 2, 100, 96),
    (3, 1, 49, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernels_match_float64(shape, dtype):
    seed = _seed()
    q, k, v = _inputs(shape, dtype, "cuda")
    do = torch.randn(shape, device="cuda", dtype=dtype)
    _check_kernels(q, k, v, do, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 1, 256, 256), (4, 2, 100, 96)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernels_fp32_ieee(shape):
    seed = _seed()
    q, k, v = _inputs(shape, torch.float32, "cuda")
    do = torch.randn(shape, device="cuda")
    _check_kernels(q, k, v, do, seed, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_op_qkv_view_autograd(dtype):
    """The AttentionBlock's layout: q, k, v viewed out of a (B, 3C, L) tensor."""
    seed = _seed()
    B, C, L = 128, 256, 256
    qkv = torch.randn(B, 3 * C, L, device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = qkv.reshape(B, 3, 1, C, L).transpose(-1, -2).unbind(1)
    with ops.use_backend("triton"):
        o = ops.attention(q, k, v)
    assert "fastddpm_attention" in type(o.grad_fn).__name__
    assert o.transpose(-1, -2).is_contiguous()
    do = torch.randn_like(o)
    (g,) = torch.autograd.grad(o, qkv, do)
    q64 = qkv.detach().double().requires_grad_()
    a, b, c = q64.reshape(B, 3, 1, C, L).transpose(-1, -2).unbind(1)
    o64 = reference.attention_ref(a, b, c)
    (g64,) = torch.autograd.grad(o64, q64, do.double())
    assert_close_rel(o, o64, dtype, f"o seed {seed}")
    assert_close_rel(g, g64, dtype, f"dqkv seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_cuda_graph(dtype):
    """fwd + bwd through ops.attention captured in a CUDA graph, replayed on new inputs."""
    shape = (32, 1, 256, 256)
    q, k, v = _inputs(shape, dtype, "cuda", requires_grad=True)
    do = torch.randn(shape, device="cuda", dtype=dtype)

    def step():
        with ops.use_backend("triton"):
            o = ops.attention(q, k, v)
        return (o,) + torch.autograd.grad(o, (q, k, v), do)

    g, outs = capture_cuda_graph(step)
    for _ in range(2):
        seed = _seed()
        with torch.no_grad():
            for t in (q, k, v, do):
                t.copy_(torch.randn_like(t))
        g.replay()
        torch.cuda.synchronize()
        refs = _ref64(q, k, v, do)
        for name, out, ref in zip(("o", "dq", "dk", "dv"), outs, (refs[0],) + refs[2:]):
            assert_close_rel(out, ref, dtype, f"graph {name} seed {seed}", tol=_tol(dtype, grad=name != "o"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_compile_fullgraph(dtype):
    seed = _seed()
    shape = (16, 2, 256, 64)
    q, k, v = _inputs(shape, dtype, "cuda", requires_grad=True)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    f = torch.compile(lambda q, k, v: (attention_triton(q * 1.5, k, v) * w).float().sum(), fullgraph=True)
    loss = f(q, k, v)
    loss.backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = (reference.attention_ref(qd * 1.5, kd, vd) * w.double()).sum()
    ref.backward()
    assert_close_rel(loss, ref, dtype, f"loss seed {seed}")
    for name, g, r in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        assert_close_rel(g, r, dtype, f"{name} seed {seed}")


@pytest.mark.gpu
def test_gpu_attention_block_uses_kernel():
    """fastddpm.nn.AttentionBlock through the triton backend (bf16 autocast, the
    packed op) vs the reference backend in float64: forward, d x and every
    parameter gradient."""
    seed = _seed()
    block = _randomised_block(256, 1, 32, device="cuda")
    block64 = _randomised_block(256, 1, 32, dtype=torch.float64, device="cuda")
    block64.load_state_dict(block.state_dict())
    x = torch.randn(8, 256, 16, 16, device="cuda")
    dout = torch.randn_like(x)
    ref, dx64, grads64, _ = _block_fwd_bwd(block64, x.double(), "reference", dout.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, dx, grads, nodes = _block_fwd_bwd(block, x, "triton", dout)
    assert any("fastddpm_attention_packed" in n for n in nodes), "the block did not run the packed op"
    # compare the attention branch, not the residual x that dominates the sum
    assert_close_rel(out.float() - x, ref - x.double(), torch.bfloat16, f"block seed {seed}")
    assert_close_rel(dx.float() - dout, dx64 - dout.double(), torch.bfloat16, f"dx seed {seed}")
    for name, g in grads.items():
        assert_close_rel(g, grads64[name], torch.bfloat16, f"d{name} seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_heads,layout", [(1, "contiguous"), (4, "contiguous"), (1, "channels_last")],
                         ids=["1head", "4heads", "1head_channels_last"])
def test_gpu_packed_op_real_shape(dtype, num_heads, layout, monkeypatch):
    """ops.attention_packed at the UNet's 16x16 attention (B=128, C=256, L=256)
    into NaN-poisoned buffers: out and the one d qkv buffer vs float64."""
    monkeypatch.setattr(attention_kernels, "POISON", True)
    seed = _seed()
    B, C, L = 128, 256, 256
    if layout == "contiguous":
        qkv = torch.randn(B, 3 * C, L, device="cuda", dtype=dtype)
    else:
        qkv = torch.randn(B, L, 3 * C, device="cuda", dtype=dtype).transpose(1, 2)
    out, g = _check_packed(qkv, num_heads, seed)
    assert torch.isfinite(out).all() and torch.isfinite(g).all(), f"unwritten (NaN) elements, seed {seed}"
    assert g.stride() == qkv.stride()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,B", [(torch.bfloat16, 128), (torch.float32, 32)], ids=["bf16", "fp32"])
def test_gpu_packed_cuda_graph(dtype, B):
    """fwd + bwd through ops.attention_packed captured in a CUDA graph, replayed on new inputs."""
    C, L = 256, 256
    qkv = torch.randn(B, 3 * C, L, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(B, C, L, device="cuda", dtype=dtype)

    def step():
        with ops.use_backend("triton"):
            out = ops.attention_packed(qkv, 1)
        return out, torch.autograd.grad(out, qkv, dout)[0]

    g, (out, dqkv) = capture_cuda_graph(step)
    for _ in range(2):
        seed = _seed()
        with torch.no_grad():
            for t in (qkv, dout):
                t.copy_(torch.randn_like(t))
        g.replay()
        torch.cuda.synchronize()
        o64, _, g64 = _packed_ref64(qkv, 1, dout)
        assert_close_rel(out, o64, dtype, f"graph out seed {seed}")
        assert_close_rel(dqkv, g64, dtype, f"graph dqkv seed {seed}", tol=_tol(dtype, grad=True))


@pytest.mark.gpu
def test_gpu_packed_compile_fullgraph():
    """inductor, fullgraph: the packed op between pointwise ops, bf16, real shape."""
    seed = _seed()
    B, C, L = 128, 256, 256
    qkv = torch.randn(B, 3 * C, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(B, C, L, device="cuda", dtype=torch.bfloat16)

    def f(qkv):
        with ops.use_backend("triton"):
            return (ops.attention_packed(qkv * 1.5, 1) * w).float().sum()

    loss = torch.compile(f, fullgraph=True)(qkv)
    loss.backward()
    x = qkv.detach().double().requires_grad_()
    ref = (attention_packed_ref(x * 1.5, 1) * w.double()).sum()
    ref.backward()
    assert_close_rel(loss, ref, torch.bfloat16, f"loss seed {seed}")
    assert_close_rel(qkv.grad, x.grad, torch.bfloat16, f"dqkv seed {seed}")


# --------------------------------------------------------------------------
# without a GPU: compile the kernels for an H100 (sm_90) ahead of time
# --------------------------------------------------------------------------
_SM90_SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastddpm.kernels import attention as ak

PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
        "DV": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "ROWMAX": "*fp32", "INVSUM": "*fp32"}
out = {}
for name, kernel, tile in (("fwd", ak._attention_fwd_kernel, (128, 32, 8, 2)),
                           ("dq", ak._attention_bwd_dq_kernel, (64, 32, 8, 2)),
                           ("dkdv", ak._attention_bwd_dkdv_kernel, (32, 64, 8, 2))):
    fn = kernel.fn
    consts = dict(BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_D=256, DOT_PRECISION="tf32")
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in PTRS:
            sig[n] = PTRS[n]
        elif n in ("qk_scale", "scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": tile[2], "num_stages": tile[3]})
    out[name] = {"wgmma": "wgmma.mma_async" in k.asm["ptx"], "shared": k.metadata.shared}
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90():
    """bf16, d = 256: the three kernels compile for sm_90 through ptxas and use
    wgmma (the tensor cores of an H100); catches GPU-only compile errors on a CPU box."""
    import json
    import os
    import subprocess
    import sys

    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("fwd", "dq", "dkdv"):
        assert res[name]["wgmma"], f"{name} kernel does not use wgmma on sm_90: {res}"
        assert res[name]["shared"] <= 227 * 1024, res
