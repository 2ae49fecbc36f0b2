"""Attention benchmarks: fastddpm's Triton flash attention against
F.scaled_dot_product_attention and the plain-PyTorch reference, for the
attention core (B=128, C=256 as one head of d=256, 16x16 = L 256, bf16) and
for the whole AttentionBlock (GroupNorm -> q/k/v 1x1 conv -> attention ->
1x1 proj -> residual). Forward and forward+backward. Block providers:
"fastddpm" is the block itself (ops.attention_packed on the (B, 3C, L) conv
output: its backward writes one d qkv buffer), "fastddpm_views" the same
parameters through ops.attention on the three q, k, v views (autograd then
zero-fills three (B, 3C, L) gradients and sums them), "fused_proj" the block
with AttentionBlock.fused_proj on (the issue-5 ablation: GroupNorm folded into
the q/k/v projection's loads and the residual into the output projection's
store, both ops.conv1x1), "sdpa" and "reference". Every provider's output
(and gradients) is first checked against a float64 reference; GPU time comes
from CUDA-graph replay (benchmarks/conftest.py: gpu_bench).

Run: pytest benchmarks/test_attention.py --benchmark-only   (skipped without CUDA)
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastddpm.ops as ops
from fastddpm import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, C, HW = 128, 256, 16
L = HW * HW
DTYPE = torch.bfloat16
TOL = 1e-2
CORE_PROVIDERS = ["fastddpm", "sdpa", "reference"]
BLOCK_PROVIDERS = ["fastddpm", "fused_proj", "fastddpm_views", "sdpa", "reference"]
MODES = ["fwd", "fwd_bwd"]


def _rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def _assert_close(out, ref, name):
    err = _rel_err(out, ref)
    assert err < TOL, f"{name}: relative error {err:.2e} >= {TOL:.0e}"


# ----------------------------------------------------------------------------- attention core

def _core_inputs(layout):
    """q, k, v (B, 1, L, d=C) and dO. "contiguous": row-major (B, 1, L, d);
    "qkv_view": views of a (B, 3C, L) conv output, as the AttentionBlock hands
    them over (L-contiguous: the layout that sends SDPA to a slow path)."""
    torch.manual_seed(0)
    if layout == "contiguous":
        q, k, v = (torch.randn(B, 1, L, C, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    else:
        qkv = torch.randn(B, 3 * C, L, device="cuda", dtype=DTYPE)
        q, k, v = (t.requires_grad_() for t in qkv.reshape(B, 3, 1, C, L).transpose(-1, -2).unbind(1))
    do = torch.randn(B, 1, L, C, device="cuda", dtype=DTYPE)
    return q, k, v, do


def _core_fn(provider):
    if provider == "fastddpm":
        def run(q, k, v):
            with ops.use_backend("triton"):
                return ops.attention(q, k, v)
        return run
    if provider == "sdpa":
        return F.scaled_dot_product_attention
    return reference.attention_ref


@pytest.mark.parametrize("provider", CORE_PROVIDERS)
@pytest.mark.parametrize("layout", ["contiguous", "qkv_view"])
@pytest.mark.parametrize("mode", MODES)
def test_attention_core(benchmark, gpu_bench, provider, layout, mode):
    q, k, v, do = _core_inputs(layout)
    fn = _core_fn(provider)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = reference.attention_ref(q64, k64, v64)
    out = fn(q, k, v)
    _assert_close(out, o64, f"{provider} out")
    if provider == "fastddpm":
        assert "fastddpm_attention" in type(out.grad_fn).__name__, "the Triton kernel did not run"
    fwd_flops = 4 * B * L * L * C
    elem = q.element_size()
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
        flops, bytes_moved = fwd_flops, 4 * B * L * C * elem
    else:
        grads = torch.autograd.grad(out, (q, k, v), do)
        refs = torch.autograd.grad(o64, (q64, k64, v64), do.double())
        for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
            _assert_close(g, r, f"{provider} {name}")

        def run():
            o = fn(q, k, v)
            torch.autograd.grad(o, (q, k, v), do)
        # model FLOPs: 2 matmuls forward, 5 backward (recomputation not counted);
        # bytes: q, k, v, o forward; q, k, v, o, dO read and dq, dk, dv written backward
        flops, bytes_moved = fwd_flops * 7 // 2, 12 * B * L * C * elem
    gpu_bench(benchmark, run, group=f"attention core {mode} B={B} L={L} d={C} 1 head bf16 {layout}",
              provider=provider, bytes_moved=bytes_moved, flops=flops,
              op="attention", shape=f"{B}x1x{L}x{C}", dtype="bf16", layout=layout)


# ----------------------------------------------------------------------------- whole AttentionBlock

def _attention_block_cls():
    try:
        from fastddpm.nn import AttentionBlock
    except ImportError:
        return None
    return AttentionBlock


def _sdpa_block(block, x):
    """The plain-PyTorch block on the same parameters: nn.functional GroupNorm,
    1x1 convs, and SDPA on the q, k, v views of the qkv conv output."""
    Bx, Cx, H, W = x.shape
    norm = block.norm
    h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    qkv = F.conv2d(h, block.qkv.weight, block.qkv.bias).reshape(Bx, 3, 1, Cx, H * W).transpose(-1, -2)
    a = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
    return x + F.conv2d(a.transpose(-1, -2).reshape(Bx, Cx, H, W), block.proj.weight, block.proj.bias)


def _views_block(block, x):
    """The block before the packed op: fastddpm's GroupNorm and ops.attention
    on the q, k, v views of the qkv conv output (three gradients for autograd
    to zero-fill and sum)."""
    Bx, Cx, H, W = x.shape
    qkv = block.qkv(block.norm(x)).reshape(Bx, 3, 1, Cx, H * W).transpose(-1, -2)
    a = ops.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
    return x + block.proj(a.transpose(-1, -2).reshape(Bx, Cx, H, W))


def _block_fn(provider, block):
    if provider == "sdpa":
        return lambda x: _sdpa_block(block, x)
    if provider == "fastddpm_views":
        def run_views(x):
            with ops.use_backend("triton"):
                return _views_block(block, x)
        return run_views
    backend = "triton" if provider in ("fastddpm", "fused_proj") else "reference"
    if provider == "fused_proj":
        block.fused_proj = True   # on this block only (the class default stays off)

    def run(x):
        with ops.use_backend(backend):
            return block(x)
    return run


@pytest.mark.parametrize("provider", BLOCK_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def test_attention_block(benchmark, gpu_bench, provider, mode):
    AttentionBlock = _attention_block_cls()
    if AttentionBlock is None:
        pytest.skip("fastddpm.nn.AttentionBlock is not there yet")
    torch.manual_seed(0)
    block = AttentionBlock(C).cuda()
    with torch.no_grad():  # the proj starts at zero: give every parameter a value
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    x = torch.randn(B, C, HW, HW, device="cuda")
    with torch.no_grad(), ops.use_backend("reference"):
        block64 = AttentionBlock(C).cuda().double()
        block64.load_state_dict(block.state_dict())
        ref = block64(x.double())
    block = block.to(DTYPE)
    x = x.to(DTYPE).requires_grad_(mode == "fwd_bwd")
    fn = _block_fn(provider, block)
    out = fn(x)
    # the residual x dominates the output: check the attention branch itself
    _assert_close(out.float() - x.float(), ref - x.double(), f"{provider} block out")
    if provider in ("fastddpm", "fastddpm_views", "fused_proj") and mode == "fwd_bwd":
        names, stack, seen = set(), [out.grad_fn], set()
        while stack:  # the autograd graph: which attention op ran
            f = stack.pop()
            if f is not None and f not in seen:
                seen.add(f)
                names.add(type(f).__name__)
                stack.extend(g for g, _ in f.next_functions)
        wants = {"fastddpm": ["fastddpm_attention_packed"], "fastddpm_views": ["fastddpm_attention_default"],
                 "fused_proj": ["fastddpm_attention_packed", "fastddpm_conv1x1"]}[provider]
        for want in wants:
            assert any(want in n for n in names), f"{provider}: {want} did not run ({sorted(names)})"
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
    else:
        params = [x] + list(block.parameters())
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, params, dout)
        x64 = x.detach().double().requires_grad_()
        with ops.use_backend("reference"):
            ref_grads = torch.autograd.grad(block64(x64), [x64] + list(block64.parameters()), dout.double())
        for (name, _), g, r in zip([("x", None)] + list(block.named_parameters()), grads, ref_grads):
            if name == "x":  # dx = dout + branch: check the branch
                _assert_close(g.float() - dout.float(), r - dout.double(), f"{provider} d{name}")
            else:
                _assert_close(g, r, f"{provider} d{name}")

        def run():
            torch.autograd.grad(fn(x), params, dout)
    # attention core FLOPs plus the 1x1 convs (qkv: 3C x C, proj: C x C per position)
    fwd_flops = 4 * B * L * L * C + 2 * B * L * 4 * C * C
    flops = fwd_flops if mode == "fwd" else 3 * fwd_flops
    gpu_bench(benchmark, run, group=f"attention block {mode} B={B} C={C} {HW}x{HW} bf16",
              provider=provider, flops=flops, op="attention_block", shape=f"{B}x{C}x{HW}x{HW}", dtype="bf16")
