"""ops.attention and its Triton flash-attention kernels against a float64 reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by the root conftest)
at small fp32 shapes; the `gpu` tests run the real shapes in bf16/fp16, inside
a CUDA graph and under torch.compile(fullgraph=True).
"""
import math

import pytest
import torch

import fastddpm.ops as ops
from fastddpm import reference
from fastddpm.kernels import attention as attention_kernels
from fastddpm.ops.attention import attention_triton
from _util import HAS_CUDA, REL_TOL, assert_close_rel, rel_err

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


def _seed():
    """Fresh inputs each run; the seed goes into failure messages."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    return seed


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

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: autotuning and compilation happen here
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
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
    """fastddpm.nn.AttentionBlock through the triton backend vs the reference backend."""
    nn_mod = pytest.importorskip("fastddpm.nn")
    if not hasattr(nn_mod, "AttentionBlock"):
        pytest.skip("fastddpm.nn.AttentionBlock not there yet")
    seed = _seed()
    block = nn_mod.AttentionBlock(256).cuda()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    x = torch.randn(8, 256, 16, 16, device="cuda")
    with ops.use_backend("reference"):
        ref = block.double()(x.double())
    block.float()
    with torch.autocast("cuda", dtype=torch.bfloat16), ops.use_backend("triton"):
        out = block(x)
    # compare the attention branch, not the residual x that dominates the sum
    assert_close_rel(out.float() - x, ref - x.double(), torch.bfloat16, f"block seed {seed}")


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
        "DV": "*bf16", "LSE": "*fp32", "DELTA": "*fp32"}
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
