"""The UNet run channels_last (model.to(memory_format=torch.channels_last)) is the
same network as NCHW: same output and parameter gradients, a contiguous NCHW
output, gradients in the parameters' layout; and the one default-layout rule."""
import pytest
import torch

import fastddpm.ops as ops
from fastddpm import UNet, UNetConfig
from _util import expect_ran, rel_err

# two heads at 4x4 and 8x8 attention (the reference's head split and its one-head view),
# Downsample's asymmetric pad, Upsample, the skip concatenations, 1x1 shortcuts
CFG = UNetConfig.tiny(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4, 8),
                      num_groups=4, dropout=0.0)


def _pair(cfg, dtype):
    torch.manual_seed(0)
    model = UNet(cfg).to(dtype)
    with torch.no_grad():  # undo the zero init so every path carries signal
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    cl = UNet(cfg).to(dtype)
    cl.load_state_dict(model.state_dict())
    return model, cl.to(memory_format=torch.channels_last)


def _fwd_bwd(model, x, t, backend):
    model.zero_grad(set_to_none=True)
    cpp = ("fastddpm_cpp::group_norm", "fastddpm_cpp::group_norm_backward")   # the C++ kernels must run
    with ops.use_backend(backend), expect_ran(*(cpp if backend == "cpp" else ())):
        out = model(x, t)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _is_nhwc(p):
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("heads", [1, 2])
def test_channels_last_equals_nchw_in_float64(heads):
    cfg = UNetConfig.from_dict({**CFG.to_dict(), "num_heads": heads})
    nchw, cl = _pair(cfg, torch.float64)
    assert cl.memory_format == torch.channels_last and nchw.memory_format == torch.contiguous_format
    x, t = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (3,))
    ref, ref_g = _fwd_bwd(nchw, x, t, "reference")
    out, g = _fwd_bwd(cl, x, t, "reference")
    assert out.is_contiguous() and out.shape == x.shape
    assert rel_err(out, ref) < 1e-12
    for n, p in cl.named_parameters():
        assert rel_err(g[n], ref_g[n]) < 1e-12, n
        # torch's idiom: a gradient in its parameter's layout (fused Adam needs that)
        assert g[n].stride() == p.stride(), n
    assert sum(_is_nhwc(p) for p in cl.parameters()) > 10


def test_channels_last_cpp_fp32_matches_the_reference():
    if ops.available_backends("cpu")["cpp"] is not None:
        pytest.skip("fastddpm._C is not built")
    nchw, cl = _pair(CFG, torch.float32)
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    ref, ref_g = _fwd_bwd(nchw, x, t, "reference")
    out, g = _fwd_bwd(cl, x, t, "cpp")
    assert out.is_contiguous()
    assert rel_err(out, ref) < 1e-5
    for n in ref_g:
        assert rel_err(g[n], ref_g[n]) < 1e-5, n


def test_channels_last_input_to_an_nchw_model_is_accepted():
    nchw, _ = _pair(CFG, torch.float64)
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (2,))
    with torch.no_grad(), ops.use_backend("reference"):
        a = nchw(x, t)
        b = nchw(x.contiguous(memory_format=torch.channels_last), t)
    assert b.is_contiguous() and rel_err(b, a) < 1e-12


def test_preferred_memory_format_rule():
    from fastddpm.ops import preferred_memory_format

    has_cpp = ops.available_backends("cpu")["cpp"] is None
    cl = torch.channels_last if has_cpp else torch.contiguous_format
    for backend, want in (("auto", cl), ("cpp", cl), ("reference", torch.contiguous_format)):
        with ops.use_backend(backend):
            assert preferred_memory_format("cpu") == want, backend
            assert preferred_memory_format(torch.device("cuda")) == torch.contiguous_format
    with ops.use_backend("triton"):
        assert preferred_memory_format("cpu") == torch.contiguous_format
