"""Draw samples from a checkpoint: `python -m fastddpm.sample --checkpoint PATH --n 64 --out DIR`.

Writes DIR/samples.png (a grid) and DIR/samples.npz (uint8 NHWC under key
arr_0, the format FID tools read). Samplers: ddpm (the paper's ancestral
sampler; respaced over fewer steps), ddim, dpmpp2m (DPM-Solver++(2M)), all
through one fused update; on CUDA each step is replayed from a CUDA graph.

Reproducibility: image i is drawn from the noise stream (--seed, i) alone, so
--n only sets how many images (a smaller --n gives the first images of a
larger one) and --batch-size only how many are denoised at once (changing it
changes the network's batch shape: results then agree up to floating-point
differences, not bit for bit). Different seeds never share a stream: seeds 0,
1, 2, ... shard a large sample (e.g. for FID) without duplicates.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from fastddpm import checkpoint
from fastddpm.allocator import keep_freed_memory
from fastddpm.images import save_grid, to_uint8
from fastddpm.sampling import (COMPILE_MODES, MAX_SEED, MEMORY_FORMATS, PRECISIONS, SAMPLERS, SPACINGS,
                               NonFiniteSamplesError, apply_memory_format, compile_model, default_precision,
                               make_plan, sample)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastddpm.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a training run folder (its newest ckpt-*.pt is used), or a "
                   "diffusers UNet2DModel / DDPMPipeline folder (e.g. google/ddpm-cifar10-32)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output folder (created if missing; checked before sampling)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples denoised at once (default 256); does not change which noise an image gets")
    p.add_argument("--seed", type=int, default=0,
                   help="noise stream, an int in [0, 2^63) (default 0): image i depends on (seed, i) only")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: ancestral (respaced when --steps < T); ddim; dpmpp2m: DPM-Solver++(2M) "
                   "(default ddpm)")
    p.add_argument("--steps", type=int, default=None,
                   help="network evaluations per sample, 1..T, at that many distinct timesteps (default T)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM noise, in [0, 1]: 0 deterministic, 1 = ancestral with fixedsmall (default 0)")
    p.add_argument("--variance", choices=("fixedlarge", "fixedsmall"), default=None,
                   help="ddpm only: sigma_t^2 = beta_t (fixedlarge) or the posterior variance (fixedsmall; "
                   "cleaner when respaced to few --steps) (default: the checkpoint's)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="timesteps kept when --steps < T: uniform; quadratic (the DDIM paper's CIFAR-10 choice); "
                   "logsnr (uniform in log(alpha/sigma), DPM-Solver's) (default: uniform for ddpm, quadratic "
                   "for ddim, logsnr for dpmpp2m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="network precision (default: bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile the network (reduce-overhead: CUDA graphs of its own); the first steps "
                   "of each batch size pay the compilation; turns the sampler's CUDA graphs off")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                   help="layout the network runs in (default auto: channels_last on the CPU when the C++ "
                   "extension fastddpm._C is loaded and the backend (FASTDDPM_BACKEND) is auto or cpp, else "
                   "contiguous; always contiguous on CUDA for now)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every step eagerly instead of replaying a captured CUDA graph (CUDA only)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1] in each step")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    # bad values: one line and exit 2, like argparse's own errors
    if args.n < 1:
        _fail(f"--n must be >= 1, got {args.n}", code=2)
    if args.batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {args.batch_size}", code=2)
    if not 0 <= args.seed <= MAX_SEED:
        _fail(f"--seed must lie in [0, 2^63), got {args.seed}", code=2)
    if args.steps is not None and args.steps < 1:
        _fail(f"--steps must be >= 1, got {args.steps}", code=2)
    if args.eta is not None and args.sampler != "ddim":
        _fail(f"--eta applies to --sampler ddim only, not {args.sampler}", code=2)
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        _fail(f"--eta must lie in [0, 1], got {args.eta}", code=2)
    args.device = _parse_device(args.device)
    return args


def _parse_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        _fail(f"--device {name}: not a device (use cpu, cuda or cuda:N)", code=2)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            _fail(f"--device {name}: CUDA is not available here", code=2)
        if device.index is not None and device.index >= torch.cuda.device_count():
            _fail(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices", code=2)
    elif device.type != "cpu":
        _fail(f"--device {name}: sampling runs on cpu or cuda, not {device.type}", code=2)
    return device


def _check_out(out):
    """Fail now, not after minutes of sampling, if `out` cannot take the images."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        _fail(f"--out {out}: cannot write there ({e.strerror or e})", code=2)


def _fail(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _write(out, images):
    """samples.npz and samples.png, each written to a temp file then renamed."""
    paths = []
    for name, write in (("samples.npz", lambda f: np.savez(f, arr_0=images)),
                        ("samples.png", lambda f: save_grid(images[:256], f))):
        path = os.path.join(out, name)
        # per process (two runs into one --out never share a temp file); keeps the
        # extension PIL reads the format from
        tmp = os.path.join(out, f".tmp-{os.getpid()}-{name}")
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            _fail(f"cannot write {path}: {e.strerror or e}")
        paths.append(path)
    return paths


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    precision = args.precision or default_precision(device)
    if precision == "fp16" and device.type == "cpu":
        print("warning: fp16 on the CPU is emulated and runs many times slower than fp32 "
              "(use --precision fp32 or bf16)", file=sys.stderr)
    try:
        model, diffusion, ckpt = checkpoint.load_for_sampling(args.checkpoint, use_ema=not args.no_ema)
    except checkpoint.CheckpointError as e:
        _fail(str(e), code=2)
    T = diffusion.num_timesteps
    if args.steps is not None and args.steps > T:  # the one bound parse_args cannot know
        _fail(f"--steps must lie in [1, T] with T = {T} for this checkpoint, got {args.steps}", code=2)
    try:
        plan = make_plan(diffusion, args.sampler, args.steps, args.eta, args.spacing, args.variance)
    except ValueError as e:
        _fail(str(e), code=2)
    _check_out(args.out)
    # a diffusers scheduler with clip_sample=false was trained/sampled without clipping x0_hat
    clip = not args.no_clip and (ckpt.get("config") or {}).get("sampling", {}).get("clip", True)
    if not clip and not args.no_clip:
        print("note: the checkpoint's scheduler has clip_sample=false: x0_hat is not clipped",
              file=sys.stderr)
    model.to(device)
    apply_memory_format(model, args.memory_format, device)
    if device.type == "cpu":
        keep_freed_memory()  # fewer page faults per step (fastddpm.allocator)
    cuda_graphs = device.type == "cuda" and not args.no_cuda_graphs and args.compile == "none"
    from fastddpm.ops import report_dispatch
    report_dispatch(model, lambda line: print(line, file=sys.stderr))  # now, and after the first step
    t0 = time.perf_counter()
    try:
        x = sample(compile_model(model, args.compile), diffusion, args.n, batch_size=args.batch_size,
                   seed=args.seed, device=device, precision=precision, clip=clip,
                   progress=not args.no_progress, sampler=args.sampler, steps=plan.steps, eta=args.eta,
                   spacing=plan.spacing, variance=args.variance, cuda_graphs=cuda_graphs)
    except NonFiniteSamplesError as e:
        _fail(f"{e} (no images written)")
    elapsed = time.perf_counter() - t0
    npz, png = _write(args.out, to_uint8(x))
    # a file without an EMA copy (diffusers folders, converted ones) has one set of weights
    weights = "the file's only weights" if ckpt.get("ema") is None else "raw weights" if args.no_ema else "EMA weights"
    step = "" if ckpt.get("step") is None else f", step {ckpt['step']}"
    print(f"{args.n} samples ({weights}{step}, {plan.describe()}, {precision}, "
          f"{device}{', CUDA graphs' if cuda_graphs else ''}) in {elapsed:.1f}s -> {png}, {npz}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
