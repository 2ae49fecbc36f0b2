"""Kernel benchmarks: fastddpm's Triton ops against the plain-PyTorch reference
and torch.compile(reference), at the shapes of DESIGN.md. Every provider's
output is first checked against a float64 reference; then GPU time (CUDA-graph
replay, median and 20/80 percentiles, GB/s) goes to extra_info and
pytest-benchmark records the host-inclusive wall time.

Run: pytest benchmarks/test_kernels.py --benchmark-only   (skipped without CUDA)
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastddpm.ops as ops
from fastddpm import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROVIDERS = ["fastddpm", "reference", "compiled"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def _assert_close(out, ref, dtype, name):
    err = _rel_err(out, ref)
    assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


def _impl(provider, ref_fn, triton_fn):
    """The callable a provider times: ops on the triton backend, the reference, or it compiled."""
    if provider == "fastddpm":
        def run(*args, **kw):
            with ops.use_backend("triton"):
                return triton_fn(*args, **kw)
        return run
    if provider == "reference":
        return ref_fn
    return torch.compile(ref_fn)


def _schedule(T=1000):
    """Float64 device tables, as GaussianDiffusion keeps them."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    tabs = dict(
        sqrt_abar=abar.sqrt(), sqrt_one_minus_abar=(1 - abar).sqrt(),
        sqrt_recip_abar=(1 / abar).sqrt(), sqrt_recipm1_abar=(1 / abar - 1).sqrt(),
        coef1=betas * abar_prev.sqrt() / (1 - abar), coef2=(1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        log_var=torch.log(torch.cat([post_var[1:2], betas[1:]])),
    )
    return {k: v.cuda() for k, v in tabs.items()}


# ----------------------------------------------------------------------------- GroupNorm + SiLU

GN_SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16)]
GN_IDS = ["128x128x32x32", "128x256x16x16"]


def _gn_inputs(shape, dtype, layout):
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = (torch.randn(C, device="cuda") * 0.5 + 1).to(dtype)
    b = (torch.randn(C, device="cuda") * 0.5).to(dtype)
    return x, w, b


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=GN_IDS)
def test_group_norm_silu_fwd(benchmark, gpu_bench, provider, layout, shape):
    dtype = torch.bfloat16
    x, w, b = _gn_inputs(shape, dtype, layout)
    fn = _impl(provider, reference.group_norm_ref, ops.group_norm)
    y = fn(x, 32, w, b, 1e-6, "silu")
    ref = reference.group_norm_ref(x.double(), 32, w.double(), b.double(), 1e-6, "silu")
    _assert_close(y, ref, dtype, "y")
    gpu_bench(benchmark, lambda: fn(x, 32, w, b, 1e-6, "silu"),
              group=f"group_norm+silu fwd {GN_IDS[GN_SHAPES.index(shape)]} bf16 {layout}",
              provider=provider, bytes_moved=2 * x.numel() * x.element_size(),
              op="group_norm_silu_fwd", shape=list(shape), dtype="bf16", layout=layout)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=GN_IDS)
def test_group_norm_silu_fwd_bwd(benchmark, gpu_bench, provider, layout, shape):
    dtype = torch.bfloat16
    x, w, b = _gn_inputs(shape, dtype, layout)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    dy = torch.randn_like(x)
    fn = _impl(provider, reference.group_norm_ref, ops.group_norm)

    def fwd_bwd():
        y = fn(x, 32, w, b, 1e-6, "silu")
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    outs = fwd_bwd()
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = reference.group_norm_ref(xr, 32, wr, br, 1e-6, "silu")
    refs = (y_ref, *torch.autograd.grad(y_ref, (xr, wr, br), dy.double()))
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), outs, refs):
        _assert_close(o, r, dtype, name)
    gpu_bench(benchmark, fwd_bwd,
              group=f"group_norm+silu fwd+bwd {GN_IDS[GN_SHAPES.index(shape)]} bf16 {layout}",
              provider=provider, bytes_moved=5 * x.numel() * x.element_size(),
              op="group_norm_silu_fwd_bwd", shape=list(shape), dtype="bf16", layout=layout)


# ----------------------------------------------------------------------------- ResBlock tail
# dropout(SiLU(GroupNorm(h + temb[:, :, None, None]))): the fusion ablation of the
# ResBlock's second norm. "fused" is one op (add on load, Philox dropout mask
# regenerated in the backward); "gn-only" fuses GroupNorm+SiLU alone with the
# add and F.dropout as separate PyTorch ops; "reference" and "compiled" are the
# plain tail and torch.compile of it.

TAIL_PROVIDERS = ["fused", "gn-only", "reference", "compiled"]


def _tail(provider, p):
    def plain(h, temb, w, b):
        y = reference.group_norm_ref(h + temb[:, :, None, None], 32, w, b, 1e-6, "silu")
        return torch.nn.functional.dropout(y, p, training=p > 0)

    if provider == "fused":
        def run(h, temb, w, b):
            with ops.use_backend("triton"):
                return ops.group_norm(h, 32, w, b, 1e-6, "silu", add=temb, dropout=p)
        return run
    if provider == "gn-only":
        def run(h, temb, w, b):
            with ops.use_backend("triton"):
                y = ops.group_norm(h + temb[:, :, None, None], 32, w, b, 1e-6, "silu")
            return torch.nn.functional.dropout(y, p, training=p > 0)
        return run
    return plain if provider == "reference" else torch.compile(plain)


@pytest.mark.parametrize("provider", TAIL_PROVIDERS)
@pytest.mark.parametrize("mode", ["eval-fwd", "train-fwd+bwd"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=GN_IDS)
def test_resblock_tail(benchmark, gpu_bench, provider, mode, shape):
    dtype = torch.bfloat16
    h, w, b = _gn_inputs(shape, dtype, "nchw")
    temb = torch.randn(shape[:2], device="cuda", dtype=dtype)
    train = mode != "eval-fwd"
    leaves = (h, temb, w, b)
    if train:
        for t in leaves:
            t.requires_grad_()
    dy = torch.randn_like(h)
    # equality without dropout, against float64
    y0 = _tail(provider, 0.0)(*leaves)
    ld = [t.detach().double() for t in leaves]
    ref = reference.group_norm_ref(ld[0] + ld[1][:, :, None, None], 32, ld[2], ld[3], 1e-6, "silu")
    _assert_close(y0, ref, dtype, "y")
    fn = _tail(provider, 0.1 if train else 0.0)
    if train:
        y = fn(*leaves)
        keep = (y != 0).float().mean().item()
        assert abs(keep - 0.9) < 0.01, f"keep rate {keep}"

        def step():
            y = fn(*leaves)
            return (y, *torch.autograd.grad(y, leaves, dy))
    else:
        def step():
            return fn(*leaves)
    gpu_bench(benchmark, step, group=f"resblock tail {mode} {GN_IDS[GN_SHAPES.index(shape)]} bf16",
              provider=provider, bytes_moved=(5 if train else 2) * h.numel() * h.element_size(),
              op=f"resblock_tail_{mode}", shape=list(shape), dtype="bf16")


# ----------------------------------------------------------------------------- AttentionBlock projections
# The fusion ablation of issue 5 at the UNet's 16x16 attention (B=128, C=256,
# L=256, bf16), the AttentionBlock's two 1x1 convs with their neighbours.
# q/k/v projection of GroupNorm(x) (M = 3C, K = C):
#   "gn+conv"     ops.group_norm (triton) materialised, then cuDNN's 1x1 conv (F.conv2d), NCHW
#   "gn+conv-cl"  the same on channels_last tensors
#   "gn+bmm"      ops.group_norm, then a batched GEMM: torch.baddbmm(bias, W, h.view(B, C, L)),
#                 i.e. torch.matmul(W, h) with the bias in the GEMM's C operand
#   "fused"       ops.conv1x1 with the GroupNorm prologue: a statistics pass (writing the folded
#                 per-channel scale/shift), then one GEMM normalising x on load; "fused-cl" on channels_last
# output projection + residual (M = K = C):
#   "conv+add"    x + F.conv2d(h, W, b) (cuDNN, then an elementwise pass); "conv+add-cl" channels_last
#   "fused"       ops.conv1x1(h, W, b, residual=x): the add before the GEMM's store; "fused-cl"
# bytes_moved counts the activations that must move at least (input read once, output written
# once, residual read once, forward) for every provider, so GB/s compare the same work.

PROJ_B, PROJ_C, PROJ_HW, PROJ_G, PROJ_EPS = 128, 256, 16, 32, 1e-6
QKV_PROVIDERS = ["gn+conv", "gn+conv-cl", "gn+bmm", "fused", "fused-cl"]
OUT_PROVIDERS = ["conv+add", "conv+add-cl", "fused", "fused-cl"]
PROJ_MODES = ["fwd", "fwd+bwd"]


def _proj_inputs(part, cl):
    """bf16 leaves of the q/k/v projection ("qkv": x, weight, bias, gn_weight, gn_bias)
    or of the output projection ("out": h, weight, bias, residual x)."""
    torch.manual_seed(0)
    dtype, fmt = torch.bfloat16, torch.channels_last if cl else torch.contiguous_format
    M = 3 * PROJ_C if part == "qkv" else PROJ_C

    def act():
        x = torch.randn(PROJ_B, PROJ_C, PROJ_HW, PROJ_HW, device="cuda").to(dtype)
        return x.contiguous(memory_format=fmt)

    w = (torch.randn(M, PROJ_C, 1, 1, device="cuda") / math.sqrt(PROJ_C)).to(dtype)
    b = torch.randn(M, device="cuda").to(dtype)
    if part == "qkv":
        gn = [(torch.randn(PROJ_C, device="cuda") * 0.5 + s).to(dtype) for s in (1.0, 0.0)]
        return [act(), w, b, *gn]
    return [act(), w, b, act()]


def _proj_fn(part, provider):
    if part == "out":
        def out_proj(h, w, b, x):
            if provider.startswith("fused"):
                with ops.use_backend("triton"):
                    return ops.conv1x1(h, w, b, residual=x)
            return x + F.conv2d(h, w, b)
        return out_proj

    def qkv_proj(x, w, b, gw, gb):
        with ops.use_backend("triton"):
            if provider.startswith("fused"):
                return ops.conv1x1(x, w, b, norm=(PROJ_G, gw, gb, PROJ_EPS))
            h = ops.group_norm(x, PROJ_G, gw, gb, PROJ_EPS)
        if provider == "gn+bmm":
            B, C, M = h.shape[0], h.shape[1], w.shape[0]
            out = torch.baddbmm(b[None, :, None], w.view(M, C).expand(B, M, C), h.view(B, C, -1))
            return out.view(B, M, *h.shape[2:])
        return F.conv2d(h, w, b)
    return qkv_proj


def _proj_ref(part, leaves):
    if part == "qkv":
        x, w, b, gw, gb = leaves
        return reference.conv1x1_ref(x, w, b, (PROJ_G, gw, gb, PROJ_EPS))
    h, w, b, x = leaves
    return reference.conv1x1_ref(h, w, b, residual=x)


def _projection(benchmark, gpu_bench, part, provider, mode):
    dtype = torch.bfloat16
    leaves = _proj_inputs(part, provider.endswith("-cl"))
    train = mode != "fwd"
    for t in leaves:
        t.requires_grad_(train)
    fn = _proj_fn(part, provider)
    out = fn(*leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = _proj_ref(part, leaves64)
    residual = leaves[3] if part == "out" else None
    if residual is None:
        _assert_close(out, ref, dtype, f"{provider} out")
    else:   # the residual would dilute the error: check the conv itself
        _assert_close(out.float() - residual.float(), ref - residual.double(), dtype, f"{provider} out")
    if provider.startswith("fused") and train:
        assert "fastddpm_conv1x1" in type(out.grad_fn).__name__, f"{provider}: the Triton op did not run"
    if train:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        for i, (g, r) in enumerate(zip(grads, torch.autograd.grad(ref, leaves64, dout.double()))):
            _assert_close(g, r, dtype, f"{provider} grad {i}")

        def step():
            o = fn(*leaves)
            return (o, *torch.autograd.grad(o, leaves, dout))
    else:
        def step():
            with torch.no_grad():
                return fn(*leaves)
    M, K, L = out.shape[1], PROJ_C, PROJ_HW * PROJ_HW
    flops = 2 * PROJ_B * L * M * K * (3 if train else 1)
    elems = PROJ_B * L * (K + M + (M if residual is not None else 0))
    layout = "cl" if provider.endswith("-cl") else "nchw"
    gpu_bench(benchmark, step, group=f"{part} projection {mode} B={PROJ_B} C={PROJ_C} {PROJ_HW}x{PROJ_HW} bf16",
              provider=provider, flops=flops, bytes_moved=elems * 2, op=f"{part}_projection_{mode}",
              shape=[PROJ_B, PROJ_C, PROJ_HW, PROJ_HW], dtype="bf16", layout=layout)


@pytest.mark.parametrize("provider", QKV_PROVIDERS)
@pytest.mark.parametrize("mode", PROJ_MODES)
def test_qkv_projection(benchmark, gpu_bench, provider, mode):
    """GroupNorm + the 1x1 q/k/v conv (M = 3C): materialised vs normalised on load."""
    _projection(benchmark, gpu_bench, "qkv", provider, mode)


@pytest.mark.parametrize("provider", OUT_PROVIDERS)
@pytest.mark.parametrize("mode", PROJ_MODES)
def test_out_projection(benchmark, gpu_bench, provider, mode):
    """The 1x1 output conv + residual (M = K = C): a separate add vs the add in the GEMM's store."""
    _projection(benchmark, gpu_bench, "out", provider, mode)


# ----------------------------------------------------------------------------- q_sample


@pytest.mark.parametrize("provider", PROVIDERS)
def test_q_sample(benchmark, gpu_bench, provider):
    tabs = _schedule()
    torch.manual_seed(0)
    x0, noise = torch.randn(128, 3, 32, 32, device="cuda"), torch.randn(128, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (128,), device="cuda")
    fn = _impl(provider, reference.q_sample_ref, ops.q_sample)
    args = (x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    ref = reference.q_sample_ref(x0.double(), t, noise.double(), *args[3:])
    _assert_close(fn(*args), ref, torch.float32, "x_t")
    gpu_bench(benchmark, lambda: fn(*args), group="q_sample B=128 3x32x32 fp32", provider=provider,
              bytes_moved=3 * x0.numel() * 4, op="q_sample", shape=[128, 3, 32, 32], dtype="fp32")


# ----------------------------------------------------------------------------- simple loss


@pytest.mark.parametrize("provider", PROVIDERS)
def test_simple_loss_fwd_bwd(benchmark, gpu_bench, provider):
    torch.manual_seed(0)
    eps_hat = torch.randn(128, 3, 32, 32, device="cuda", requires_grad=True)
    noise = torch.randn(128, 3, 32, 32, device="cuda")
    fn = _impl(provider, reference.simple_loss_ref, ops.simple_loss)

    def fwd_bwd():
        loss = fn(eps_hat, noise)
        return loss, torch.autograd.grad(loss, eps_hat)[0]

    loss, g = fwd_bwd()
    er = eps_hat.detach().double().requires_grad_()
    ref = reference.simple_loss_ref(er, noise.double())
    _assert_close(loss, ref, torch.float32, "loss")
    _assert_close(g, torch.autograd.grad(ref, er)[0], torch.float32, "grad")
    gpu_bench(benchmark, fwd_bwd, group="simple_loss fwd+bwd B=128 3x32x32 fp32", provider=provider,
              bytes_moved=4 * eps_hat.numel() * 4, op="simple_loss_fwd_bwd", shape=[128, 3, 32, 32], dtype="fp32")


# ----------------------------------------------------------------------------- sampler step

STEP = ("sqrt_recip_abar", "sqrt_recipm1_abar", "coef1", "coef2", "log_var")


def _step_ref_with_randn(x, t, eps, *tables):
    """The plain sampler step, noise drawn by torch.randn (what the reference pays)."""
    return reference.p_sample_step_ref(x, t, eps, *tables, torch.randn_like(x))


@pytest.mark.parametrize("provider", ["fastddpm-philox", "fastddpm-noise", "reference", "compiled"])
def test_sampler_step(benchmark, gpu_bench, provider):
    tabs = _schedule()
    tables = tuple(tabs[k] for k in STEP)
    torch.manual_seed(0)
    B = 1024
    x, eps, z = (torch.randn(B, 3, 32, 32, device="cuda") for _ in range(3))
    t = torch.randint(1, 1000, (B,), device="cuda")
    ref = reference.p_sample_step_ref(x.double(), t, eps.double(), *tables, z.double())
    # the explicit-noise math, checked for every provider family
    with ops.use_backend("triton"):
        _assert_close(ops.p_sample_step(x, t, eps, *tables, z), ref, torch.float32, "x_{t-1}")
    nbytes = 4 * x.numel() * 4
    if provider == "fastddpm-philox":
        def fn():
            with ops.use_backend("triton"):
                return ops.p_sample_step(x, t, eps, *tables, seed=1234)
        mean = reference.p_sample_step_ref(x, t, eps, *tables, torch.zeros_like(x))
        std = torch.exp(0.5 * tabs["log_var"][t].float()).view(-1, 1, 1, 1)
        zs = ((fn() - mean) / std).double()
        assert abs(zs.mean().item()) < 0.01 and abs(zs.std().item() - 1) < 0.01, "Philox noise is not N(0, 1)"
        nbytes = 3 * x.numel() * 4
    elif provider == "fastddpm-noise":
        def fn():
            with ops.use_backend("triton"):
                return ops.p_sample_step(x, t, eps, *tables, z)
    else:
        impl = _step_ref_with_randn if provider == "reference" else torch.compile(_step_ref_with_randn)

        def fn():
            return impl(x, t, eps, *tables)
        out = fn()
        mean = reference.p_sample_step_ref(x, t, eps, *tables, torch.zeros_like(x))
        std = torch.exp(0.5 * tabs["log_var"][t].float()).view(-1, 1, 1, 1)
        zs = ((out - mean) / std).double()
        assert abs(zs.mean().item()) < 0.01 and abs(zs.std().item() - 1) < 0.01
    gpu_bench(benchmark, fn, group="sampler step (mean + noise) B=1024 3x32x32 fp32", provider=provider,
              bytes_moved=nbytes, op="p_sample_step", shape=[B, 3, 32, 32], dtype="fp32")
