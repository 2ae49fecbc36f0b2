"""Whole-model throughput on the GPU: a DDPM training step (images/s) and a
sampler step (network evaluations/s) of the CIFAR-10 UNet, on the reference
backend and on the fused backend, in the same run. Times host-inclusive wall
time per iteration after warm-up, synchronised (CUDA graphs come later).

Run: pytest benchmarks/test_model.py --benchmark-only (skipped without CUDA).
"""
import pytest
import torch

import fastddpm.ops as ops
from fastddpm import GaussianDiffusion, UNet, UNetConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 10


def _setup(batch, train):
    torch.manual_seed(0)
    model = UNet(UNetConfig.cifar10()).cuda().to(memory_format=torch.channels_last)
    model.train(train)
    d = GaussianDiffusion.linear().cuda()
    x = torch.randn(batch, 3, 32, 32, device="cuda").clamp(-1, 1).contiguous(memory_format=torch.channels_last)
    return model, d, x


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_train_step_cifar10_bf16(benchmark, backend):
    batch = 128
    model, d, x0 = _setup(batch, train=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)

    def steps():
        with ops.use_backend(backend):
            for _ in range(STEPS):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = d.training_loss(model, x0)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    steps()  # warm-up: autotune, cuDNN algorithm choice
    benchmark.group = "train step, CIFAR-10 UNet, batch 128, bf16"
    benchmark.pedantic(steps, rounds=3, iterations=1)
    per_step = benchmark.stats.stats.median / STEPS
    benchmark.extra_info.update(backend=backend, images_per_s=batch / per_step, device=torch.cuda.get_device_name())


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_sampler_step_cifar10_bf16(benchmark, backend):
    batch = 256
    model, d, x = _setup(batch, train=False)

    @torch.no_grad()
    def steps():
        xt = x
        with ops.use_backend(backend):
            for i in range(STEPS):
                t = torch.full((batch,), 999 - i, dtype=torch.long, device="cuda")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    eps = model(xt, t)
                xt = d.p_sample_step(xt, t, eps.float(), torch.randn_like(xt))
        torch.cuda.synchronize()

    steps()
    benchmark.group = "sampler step, CIFAR-10 UNet, batch 256, bf16"
    benchmark.pedantic(steps, rounds=3, iterations=1)
    per_step = benchmark.stats.stats.median / STEPS
    benchmark.extra_info.update(backend=backend, net_evals_per_s=batch / per_step,
                                device=torch.cuda.get_device_name())
