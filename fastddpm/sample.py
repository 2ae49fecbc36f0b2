"""Draw samples from a checkpoint: `python -m fastddpm.sample --checkpoint PATH --n 64 --out DIR`.

Writes DIR/samples.png (a grid) and DIR/samples.npz (uint8 NHWC under key
arr_0, the format FID tools read).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

from fastddpm import checkpoint
from fastddpm.images import save_grid, to_uint8
from fastddpm.sampling import COMPILE_MODES, PRECISIONS, compile_model, default_precision, sample


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastddpm.sample", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, or a training run folder (its newest ckpt-*.pt is used)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--batch-size", type=int, default=256, help="samples drawn at once")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed and batch size: same samples)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="network precision (default: bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile the network (reduce-overhead: CUDA graphs); the first steps "
                   "of each batch size pay the compilation")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1] in each step")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")
    precision = args.precision or default_precision(device)
    try:
        model, diffusion, ckpt = checkpoint.load_for_sampling(args.checkpoint, use_ema=not args.no_ema)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    model.to(device)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    x = sample(compile_model(model, args.compile), diffusion, args.n, batch_size=args.batch_size, seed=args.seed, device=device,
               precision=precision, clip=not args.no_clip, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    images = to_uint8(x)
    npz = os.path.join(args.out, "samples.npz")
    png = os.path.join(args.out, "samples.png")
    np.savez(npz, arr_0=images)
    save_grid(images[:256], png)
    weights = "raw" if args.no_ema or ckpt.get("ema") is None else "EMA"
    print(f"{args.n} samples ({weights} weights, step {ckpt.get('step')}, {precision}, {device}) in "
          f"{elapsed:.1f}s -> {png}, {npz}", file=sys.stderr)


if __name__ == "__main__":
    main()
