"""The whole UNet on the Triton backend equals the reference backend: forward
output and every parameter gradient (CPU interpreter at a tiny size; the real
configs and dtypes on the GPU)."""
import pytest
import torch

import fastddpm.ops as ops
from fastddpm import GaussianDiffusion, UNet, UNetConfig
from _util import HAS_CUDA, expect_ran, rel_err

CPU_CFG = UNetConfig.tiny(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                          num_groups=4, dropout=0.0)


def _randomised(cfg, device, seed=0):
    torch.manual_seed(seed)
    model = UNet(cfg).to(device)
    with torch.no_grad():  # undo the zero init so every path carries signal
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    return model


# the Triton custom ops the UNet runs on backend "triton", forward and backward
UNET_OPS = ("fastddpm::group_norm", "fastddpm::group_norm_backward")


def _run(model, x, t, backend, dtype):
    model.zero_grad(set_to_none=True)
    with ops.use_backend(backend), expect_ran(*(UNET_OPS if backend == "triton" else ())) as ran:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
            out = model(x, t)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum().backward()
    if backend == "triton":   # and the attention block's kernels, both directions
        attention = {k for k in ran if k.startswith("fastddpm::attention")}
        assert any(k.endswith("_backward") for k in attention) and any(not k.endswith("_backward") for k in attention), \
            f"the attention kernels did not run forward and backward: {sorted(ran)}"
    return out.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _compare(cfg, device, dtype, batch, tol):
    model = _randomised(cfg, device)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    out, grads = _run(model, x, t, "triton", dtype)
    # the reference in float64 is the ground truth
    ref_model = _randomised(cfg, device).double()
    ref_out, ref_grads = _run(ref_model, x.double(), t, "reference", torch.float64)
    assert rel_err(out, ref_out) < tol, f"forward: {rel_err(out, ref_out):.2e}"
    worst = max(((rel_err(grads[n], ref_grads[n]), n) for n in grads if ref_grads[n].norm() > 0))
    assert worst[0] < tol, f"gradient of {worst[1]}: {worst[0]:.2e}"


def test_unet_triton_backend_matches_reference_cpu():
    _compare(CPU_CFG, "cpu", torch.float32, batch=2, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [UNetConfig.tiny(dropout=0.0), UNetConfig.cifar10(dropout=0.0)], ids=["tiny", "cifar10"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_triton_backend_matches_reference_gpu(cfg, dtype):
    # fp32 runs the convs in TF32 on the GPU unless disabled: compare in full fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    _compare(cfg, "cuda", dtype, batch=4, tol=1e-4 if dtype == torch.float32 else 2e-2)


def test_training_loss_and_sampler_step_on_triton_backend_cpu():
    d = GaussianDiffusion.linear(T=50)
    model = _randomised(CPU_CFG, "cpu")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 37])
    noise, eps = torch.randn_like(x0), torch.randn_like(x0)
    losses = []
    with ops.use_backend("reference"):
        losses.append(d.training_loss(model, x0, t, noise))
        losses.append(d.p_sample_step(x0, t, eps, noise))
    with ops.use_backend("triton"), expect_ran("fastddpm::q_sample", "fastddpm::simple_loss", "fastddpm::p_sample_step",
                                               *UNET_OPS[:1]):
        losses.append(d.training_loss(model, x0, t, noise))
        losses.append(d.p_sample_step(x0, t, eps, noise))
    assert rel_err(losses[2], losses[0]) < 1e-6
    assert rel_err(losses[3], losses[1]) < 1e-6
