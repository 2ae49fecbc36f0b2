"""The sampler loop: network evaluations/s of the CIFAR-10 UNet (bf16) at batch
256-1024, and one whole 1000-step sample at batch 1, three ways in the same
run: eager (the fused sampler step, one launch per op), graphed (our CUDA-graph
runner: one replay per step) and torch.compile(mode="reduce-overhead") of the
network (inductor + cudagraph trees), eager sampler step around it. On the CPU:
the tiny model's loop, the reference (GaussianDiffusion's ancestral step, one
op per term) against the fused table step, checked equal before timing.

Warm-up (capture, compilation, autotuning) is done before timing and reported
as warmup_s. Run: pytest benchmarks/test_sampling.py --benchmark-only.
"""
import time

import pytest
import torch

import fastddpm.ops as ops
from fastddpm import GaussianDiffusion, UNet, UNetConfig, reference
from fastddpm.runtime import compile_model
from fastddpm.sampling import make_plan, sample_batch
from fastddpm.sampling.graphs import CudaGraphRunner

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 20                      # timed steps per round of the throughput benchmark
PROVIDERS = ("eager", "graphed", "compile-reduce-overhead")


def _cifar10():
    torch.manual_seed(0)
    model = UNet(UNetConfig.cifar10()).cuda().eval()
    return model, GaussianDiffusion.linear().cuda()


def _runner(provider, model, d, plan, batch):
    """A function that samples one batch with `provider`, and the model it uses."""
    net = compile_model(model, "reduce-overhead") if provider.startswith("compile") else model
    runner = CudaGraphRunner(max_graphs=1) if provider == "graphed" else None

    @torch.no_grad()
    def run():
        x = sample_batch(net, d, batch, 0, plan=plan, device="cuda", precision="bf16", progress=False,
                         runner=runner)
        torch.cuda.synchronize()
        return x
    return run


@GPU
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [256, 512, 1024])
def test_net_evals_per_s_cifar10_bf16(benchmark, provider, batch):
    model, d = _cifar10()
    plan = make_plan(d, "ddim", STEPS)
    run = _runner(provider, model, d, plan, batch)
    t0 = time.perf_counter()
    first = run()                                   # capture / compile
    warmup_s = time.perf_counter() - t0
    assert torch.isfinite(first).all()
    benchmark.group = f"sampler loop, CIFAR-10 UNet bf16, batch {batch}, {STEPS} ddim steps"
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(provider=provider, batch=batch, warmup_s=warmup_s,
                                device=torch.cuda.get_device_name(),
                                peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20)
    if benchmark.stats:                             # None under --benchmark-disable
        benchmark.extra_info["net_evals_per_s"] = batch * STEPS / benchmark.stats.stats.median


@GPU
@pytest.mark.parametrize("provider", PROVIDERS)
def test_1000_step_sample_batch_1_cifar10_bf16(benchmark, provider):
    model, d = _cifar10()
    plan = make_plan(d, "ddpm")
    run = _runner(provider, model, d, plan, 1)
    t0 = time.perf_counter()
    run()
    warmup_s = time.perf_counter() - t0
    benchmark.group = "one 1000-step ddpm sample, CIFAR-10 UNet bf16, batch 1"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(provider=provider, warmup_s=warmup_s, device=torch.cuda.get_device_name())
    if benchmark.stats:
        benchmark.extra_info["seconds"] = benchmark.stats.stats.median


def _reference_loop(model, d, n, seed):
    """Ancestral sampling with GaussianDiffusion's own step (unfused, one op per
    term) and the sampler's noise stream: what the fused loop must equal."""
    shape = (n, model.config.in_channels, model.config.image_size, model.config.image_size)
    x = reference.philox_normal_ref(torch.tensor([seed, 0, 0]), shape)
    with ops.use_backend("reference"):
        for k, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
            t = torch.full((n,), i)
            z = reference.philox_normal_ref(torch.tensor([seed, k + 1, 0]), shape)
            x = d.p_sample_step(x, t, model(x, t), z)
    return x


@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_tiny_sampler_loop_cpu(benchmark, provider):
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    d = GaussianDiffusion.linear(T=20)
    plan = make_plan(d, "ddpm")
    n = 8

    @torch.no_grad()
    def fused():
        return sample_batch(model, d, n, 0, plan=plan, device="cpu", progress=False)

    @torch.no_grad()
    def ref():
        return _reference_loop(model, d, n, 0)

    torch.testing.assert_close(fused(), ref(), atol=1e-4, rtol=1e-4)
    benchmark.group = f"tiny UNet sampler loop, CPU, batch {n}, {d.num_timesteps} ddpm steps"
    benchmark.pedantic(fused if provider == "fused" else ref, rounds=3, iterations=1)
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
    if benchmark.stats:
        benchmark.extra_info["steps_per_s"] = d.num_timesteps / benchmark.stats.stats.median

