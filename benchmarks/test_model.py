"""Whole-model throughput on the GPU: a DDPM training step (images/s) and a
sampler step (network evaluations/s) of the CIFAR-10 UNet, on the reference
backend and on the fused backend, eager and under torch.compile (the CLIs'
--compile: "default", or "reduce-overhead" = CUDA graphs), in the same run.
Times host-inclusive wall time per iteration after warm-up (compilation,
autotuning), synchronised.

Run: pytest benchmarks/test_model.py --benchmark-only (skipped without CUDA).
"""
import pytest
import torch

import fastddpm.ops as ops
from fastddpm import GaussianDiffusion, UNet, UNetConfig
from fastddpm.sampling import compile_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 10
# (backend, compile mode): plain PyTorch, fused kernels, and each under torch.compile
VARIANTS = [("reference", "none"), ("auto", "none"), ("reference", "default"), ("auto", "default"),
            ("auto", "reduce-overhead")]
VARIANT_IDS = [f"{b}-{c}" for b, c in VARIANTS]


def _setup(batch, train):
    torch.manual_seed(0)
    model = UNet(UNetConfig.cifar10()).cuda().to(memory_format=torch.channels_last)
    model.train(train)
    d = GaussianDiffusion.linear().cuda()
    x = torch.randn(batch, 3, 32, 32, device="cuda").clamp(-1, 1).contiguous(memory_format=torch.channels_last)
    return model, d, x


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=VARIANT_IDS)
def test_train_step_cifar10_bf16(benchmark, backend, mode):
    batch = 128
    model, d, x0 = _setup(batch, train=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    net = compile_model(model, mode)

    def steps():
        with ops.use_backend(backend):
            for _ in range(STEPS):
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = d.training_loss(net, x0)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    steps()  # warm-up: compilation, autotune, cuDNN algorithm choice
    benchmark.group = "train step, CIFAR-10 UNet, batch 128, bf16"
    benchmark.pedantic(steps, rounds=3, iterations=1)
    per_step = benchmark.stats.stats.median / STEPS
    benchmark.extra_info.update(backend=backend, compile=mode, images_per_s=batch / per_step,
                                device=torch.cuda.get_device_name())


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=VARIANT_IDS)
def test_sampler_step_cifar10_bf16(benchmark, backend, mode):
    batch = 256
    model, d, x = _setup(batch, train=False)
    net = compile_model(model, mode)

    @torch.no_grad()
    def steps():
        xt = x
        with ops.use_backend(backend):
            for i in range(STEPS):
                t = torch.full((batch,), 999 - i, dtype=torch.long, device="cuda")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    eps = net(xt, t)
                xt = d.p_sample_step(xt, t, eps.float(), torch.randn_like(xt))
        torch.cuda.synchronize()

    steps()
    benchmark.group = "sampler step, CIFAR-10 UNet, batch 256, bf16"
    benchmark.pedantic(steps, rounds=3, iterations=1)
    per_step = benchmark.stats.stats.median / STEPS
    benchmark.extra_info.update(backend=backend, compile=mode, net_evals_per_s=batch / per_step,
                                device=torch.cuda.get_device_name())
