"""Whole-model throughput on the GPU: a DDPM training step (images/s) and a
sampler step (network evaluations/s) of the CIFAR-10 UNet, on the reference
backend and on the fused backend, eager and under torch.compile (the CLIs'
--compile: "default", or "reduce-overhead" = CUDA graphs), in the same run.
Times host-inclusive wall time per iteration after warm-up (compilation,
autotuning), synchronised. Before timing, each variant is checked against the
plain-PyTorch reference in fp32 on the same weights and inputs (eval mode, so
no dropout): the network output for the sampler, the loss and every parameter
gradient for the training step. The sampler loop times what
fastddpm.sampling runs per step: the network, then the unchecked
GaussianDiffusion._p_sample_step (the public p_sample_step reads t.min() and
t.max() on the host, two device syncs per step that the sampler never makes).

Run: pytest benchmarks/test_model.py --benchmark-only (skipped without CUDA).
"""
import pytest
import torch

import fastddpm.ops as ops
from fastddpm import GaussianDiffusion, UNet, UNetConfig
from fastddpm.runtime import compile_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 10
# ||variant - fp32 reference|| / ||reference|| bound: bf16 autocast through the
# whole UNet (35.7M parameters, ~50 layers deep) lands at a few 1e-3.
MODEL_TOL = 3e-2
# (backend, compile mode): plain PyTorch, fused kernels, and each under torch.compile
VARIANTS = [("reference", "none"), ("auto", "none"), ("reference", "default"), ("auto", "default"),
            ("auto", "reduce-overhead")]
VARIANT_IDS = [f"{b}-{c}" for b, c in VARIANTS]


def _setup(batch, train):
    torch.manual_seed(0)
    model = UNet(UNetConfig.cifar10()).cuda().to(memory_format=torch.channels_last)
    with torch.no_grad():  # no zero-initialised layer: never time (or check) on zeros
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    model.train(train)
    d = GaussianDiffusion.linear().cuda()
    x = torch.randn(batch, 3, 32, 32, device="cuda").clamp(-1, 1).contiguous(memory_format=torch.channels_last)
    return model, d, x


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def _call(net, mode, x, t):
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return net(x, t)


def _assert_matches_reference(model, net, d, backend, mode, train, batch=8):
    """The variant's output (and for training the loss and parameter gradients)
    against the reference backend in fp32, eval mode, on the same inputs."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    size = model.config.image_size
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=dev, generator=g).clamp(-1, 1).contiguous(
        memory_format=torch.channels_last)
    t = torch.randint(0, d.num_timesteps, (batch,), device=dev, generator=g)
    noise = torch.randn(x.shape, device=dev, generator=g)

    def run(fn, backend_, grads):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(backend_):
            if not grads:
                with torch.no_grad():
                    return [fn(x, t).float().clone()]
            loss = d.training_loss(fn, x, t=t, noise=noise, check_t=False)
            loss.backward()
        return [loss.detach().clone()] + [p.grad.detach().clone() for p in model.parameters()]

    ref = run(model, "reference", train)
    got = run(lambda x_, t_: _call(net, mode, x_, t_), backend, train)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    pairs = [("loss" if train else "eps", got[0], ref[0])]
    if train:  # all parameter gradients as one vector (some layers' are tiny)
        pairs.append(("gradient", torch.cat([g.flatten() for g in got[1:]]), torch.cat([g.flatten() for g in ref[1:]])))
    for name, a, b in pairs:
        err = _rel_err(a, b)
        assert err < MODEL_TOL, f"{backend}/{mode}: {name} relative error {err:.2e} vs the fp32 reference"


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=VARIANT_IDS)
def test_train_step_cifar10_bf16(benchmark, backend, mode):
    batch = 128
    model, d, x0 = _setup(batch, train=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    net = compile_model(model, mode)
    _assert_matches_reference(model, net, d, backend, mode, train=True)

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
    _assert_matches_reference(model, net, d, backend, mode, train=False)

    @torch.no_grad()
    def steps():
        xt = x
        with ops.use_backend(backend):
            for i in range(STEPS):
                t = torch.full((batch,), 999 - i, dtype=torch.long, device="cuda")
                eps = _call(net, mode, xt, t)
                # what fastddpm.sampling runs: t built here, so no host-side range check
                xt = d._p_sample_step(xt, t, eps.float(), torch.randn_like(xt))
        torch.cuda.synchronize()

    steps()
    benchmark.group = "sampler step, CIFAR-10 UNet, batch 256, bf16"
    benchmark.pedantic(steps, rounds=3, iterations=1)
    per_step = benchmark.stats.stats.median / STEPS
    benchmark.extra_info.update(backend=backend, compile=mode, net_evals_per_s=batch / per_step,
                                device=torch.cuda.get_device_name())
