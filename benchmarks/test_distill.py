"""Progressive distillation on a GPU (issue 25, item 5): distillation images/s on
the CIFAR-10 UNet (bf16; one update = two teacher evaluations + the student's
forward and backward + Adam + EMA, through DistillTrainer.train_step), and a
4-step v student's sampling images/s (ddim on its grid, graphed). Random
weights and random 32x32 data: the speed does not depend on them. The rest
stage of benchmarks/run_gpu.sh runs this file. Run alone:
pytest benchmarks/test_distill.py --benchmark-only.
"""
import time

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, UNet, UNetConfig
from fastddpm.sampling import make_plan
from test_sampling import _runner

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 10                       # timed updates per round


def _teacher_file(tmp_path):
    """A cifar10-preset teacher checkpoint (random weights, trained on random data)."""
    from fastddpm import checkpoint as C
    from fastddpm.training.config import preset_config
    torch.manual_seed(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3), dtype=np.uint8))
    cfg = preset_config("cifar10")
    cfg.data = str(data)
    net = UNet(UNetConfig.cifar10())
    sd = net.state_dict()
    path = tmp_path / "teacher.pt"
    C.atomic_save({"format": C.FORMAT, "version": C.VERSION, "step": 0,
                   "config": {"model": net.config.to_dict(), "diffusion": GaussianDiffusion.linear().config,
                              "train": cfg.to_dict()},
                   "model": sd, "ema": sd}, path)
    return path


@GPU
@pytest.mark.parametrize("batch", [128])
def test_distillation_images_per_s_cifar10_bf16(benchmark, tmp_path, batch):
    from fastddpm.distill import new_run
    from fastddpm.training.distill import DistillTrainer
    given = {"teacher": str(_teacher_file(tmp_path)), "out": str(tmp_path / "run"), "batch_size": batch,
             "device": "cuda", "precision": "bf16", "workers": 0, "round_iters": 1000, "start_steps": 512,
             "convert_iters": 0}
    cfg, dcfg, s_diff, t_diff, teacher = new_run(given)
    tr = DistillTrainer(cfg, dcfg, s_diff, t_diff, teacher=teacher)
    batch_u8 = tr.dataset[np.arange(batch)]

    def run():
        for _ in range(STEPS):
            j, noise, flip = tr.draw(tr.step)
            tr.train_step(batch_u8, j, noise, flip, tr.lr_at(tr.step))
            tr.step += 1
        torch.cuda.synchronize()

    t0 = time.perf_counter()
    run()                                           # warm-up: cuDNN autotuning, allocator
    warmup_s = time.perf_counter() - t0
    assert np.isfinite(tr.read_window()["loss"])
    benchmark.group = f"distillation update, CIFAR-10 UNet bf16, batch {batch}"
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(provider="DistillTrainer", batch=batch, warmup_s=warmup_s,
                                device=torch.cuda.get_device_name(),
                                peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20)
    if benchmark.stats:
        benchmark.extra_info["images_per_s"] = batch * STEPS / benchmark.stats.stats.median


@GPU
@pytest.mark.parametrize("batch", [256, 1024])
def test_4_step_student_images_per_s_cifar10_bf16(benchmark, batch):
    from fastddpm.training.distill import grid
    torch.manual_seed(0)
    model = UNet(UNetConfig.cifar10()).cuda().eval()
    d = GaussianDiffusion.linear(prediction="v").cuda()
    plan = make_plan(d, "ddim", timesteps=grid(d.num_timesteps, 4))
    run = _runner("graphed", model, d, plan, batch)   # benchmarks/test_sampling.py's graphed sampler

    t0 = time.perf_counter()
    assert torch.isfinite(run()).all()             # capture
    warmup_s = time.perf_counter() - t0
    benchmark.group = f"4-step student sampling, CIFAR-10 UNet bf16, graphed, batch {batch}"
    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(provider="ddim-4-distilled-grid", batch=batch, warmup_s=warmup_s,
                                device=torch.cuda.get_device_name())
    if benchmark.stats:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
