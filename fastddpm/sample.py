"""Draw samples from a checkpoint: `python -m fastddpm.sample --checkpoint PATH --n 64 --out DIR`.

Writes DIR/samples.png (a grid) and DIR/samples.npz (uint8 NHWC under key
arr_0, the format FID tools read). DIR belongs to one sampling: it is locked
while sampling runs (a second run on it is refused), a DIR that already holds
samples is refused unless --overwrite, and the new files replace the old ones
only once both are complete. A run that fails leaves no files (and no DIR it
created) behind. Exit codes: 0 done, 1 sampling or writing failed (non-finite
network outputs, out of memory, disk), 2 bad input (flags, checkpoint, --out),
128 + signal when stopped by SIGINT/SIGTERM. Samplers: ddpm (the paper's ancestral
sampler; respaced over fewer steps), ddim, dpmpp2m / dpmpp3m (DPM-Solver++(2M)
/ (3M)), unipc (UniPC, --order 1-3, --variant bh1/bh2), ipndm (improved PNDM,
--order 1-4), all through one fused update; on CUDA each step is replayed from
a CUDA graph. The timesteps: --spacing, or an explicit --timesteps 999,700,...
--restart (Restart sampling, ddpm) and --threshold (dynamic thresholding of
x0_hat) are off unless asked for, or recorded by the training run that wrote the
checkpoint (its --sample-restart / --sample-threshold, as the tiny preset does):
then they are the defaults, said on stderr, and `--restart none --threshold 0`
gives the plain sampler.
A distilled student (fastddpm.distill) samples by default with the sampler and
grid its checkpoint records (N steps, N network evaluations); asking for another
sampler or grid warns that it was distilled for N steps.

Reproducibility: image i is drawn from the noise stream (--seed, i) alone, so
--n only sets how many images (a smaller --n gives the first images of a
larger one) and --batch-size only how many are denoised at once (changing it
changes the network's batch shape: results then agree up to floating-point
differences, not bit for bit). Different seeds never share a stream: seeds 0,
1, 2, ... shard a large sample (e.g. for FID) without duplicates.
"""
import argparse
import os
import signal
import sys
import time

import numpy as np
import torch

from fastddpm import checkpoint, files, limits, loader
from fastddpm.allocator import keep_freed_memory
from fastddpm.images import save_grid, to_uint8
from fastddpm.runtime import (COMPILE_MODES, MEMORY_FORMATS, PRECISIONS, apply_memory_format, compile_model,
                              default_precision, parse_device)
from fastddpm.sampling import (MAX_SEED, ORDERS, SAMPLERS, SPACINGS, UNIPC_VARIANTS, NonFiniteSamplesError, make_plan,
                               parse_restart, sample)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastddpm.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a training run folder (its newest ckpt-*.pt is used), or a "
                   "diffusers UNet2DModel / DDPMPipeline folder (e.g. google/ddpm-cifar10-32)")
    p.add_argument("--n", type=int, default=64,
                   help=f"number of samples, at most {limits.MAX_SAMPLES:,} (default 64)")
    p.add_argument("--out", required=True, help="output folder (created if missing; checked and locked before "
                   "sampling; refused if it already holds samples.npz or samples.png, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the samples.npz / samples.png an earlier sampling left in --out")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples denoised at once (default 256); does not change which noise an image gets")
    p.add_argument("--seed", type=int, default=0,
                   help="noise stream, an int in [0, 2^63) (default 0): image i depends on (seed, i) only")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm: ancestral (respaced when --steps < T); ddim; dpmpp2m / dpmpp3m: DPM-Solver++(2M) / "
                   "(3M); unipc: UniPC predictor-corrector; ipndm: improved PNDM (default ddpm; for a distilled "
                   "student (fastddpm.distill) ddim on the grid it was distilled for, which its checkpoint records)")
    p.add_argument("--steps", type=int, default=None,
                   help="network evaluations per sample, 1..T, at that many distinct timesteps (default T)")
    p.add_argument("--order", type=int, default=None,
                   help="unipc: 1-3 (default 3); ipndm: 1-4 (default 4); lower orders in the first steps")
    p.add_argument("--variant", choices=UNIPC_VARIANTS, default=None,
                   help="unipc only: B(h) = h (bh1) or e^h - 1 (bh2, default)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM noise, in [0, 1]: 0 deterministic, 1 = ancestral with fixedsmall (default 0)")
    p.add_argument("--variance", choices=("fixedlarge", "fixedsmall"), default=None,
                   help="ddpm only: sigma_t^2 = beta_t (fixedlarge) or the posterior variance (fixedsmall; "
                   "cleaner when respaced to few --steps) (default: the checkpoint's)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="timesteps kept when --steps < T: uniform; trailing (uniform from T-1); quadratic (the "
                   "DDIM paper's CIFAR-10 choice); logsnr (uniform in log(alpha/sigma), DPM-Solver's); edm "
                   "(Karras et al.'s rho = 7 sigma grid) (default: uniform for ddpm, logsnr for ipndm, "
                   "quadratic for the others)")
    p.add_argument("--timesteps", default=None, metavar="LIST",
                   help="explicit timesteps instead of --spacing: comma-separated, strictly decreasing integers "
                   "in [0, T-1], e.g. 999,700,400,100,0 (sets --steps)")
    p.add_argument("--restart", default=None, metavar="LO,HI,K",
                   help="ddpm only: Restart sampling (Xu et al. 2023): once the chain reaches timestep LO, "
                   "K times re-noise it to timestep HI and denoise back (K x (HI - LO) more network "
                   "evaluations on the full grid), e.g. 0,9,16; 'none': off (default: off, or what the "
                   "checkpoint's training run recorded)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="dynamic thresholding (Saharia et al. 2022): clip x0_hat to the P-quantile of its "
                   "|values| (at least 1) and rescale to [-1, 1], per sample, P in (0, 1]; 0: plain clipping "
                   "(default: 0, or what the checkpoint's training run recorded)")
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
    args.sampler_given, args.sampler = args.sampler is not None, args.sampler or "ddpm"
    # bad values: one line and exit 2, like argparse's own errors
    if not 1 <= args.n <= limits.MAX_SAMPLES:
        _fail(f"--n must lie in [1, {limits.MAX_SAMPLES:,}], got {args.n} (fastddpm's bound; shard a larger "
              "set over --seed 0, 1, ...: seeds never share a noise stream)", code=2)
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
    if args.order is not None and args.sampler not in ORDERS:
        _fail(f"--order applies to --sampler {' or '.join(ORDERS)} only, not {args.sampler}", code=2)
    if args.order is not None and not ORDERS[args.sampler][0] <= args.order <= ORDERS[args.sampler][1]:
        lo, hi, _ = ORDERS[args.sampler]
        _fail(f"--order of {args.sampler} must lie in [{lo}, {hi}], got {args.order}", code=2)
    if args.variant is not None and args.sampler != "unipc":
        _fail(f"--variant applies to --sampler unipc only, not {args.sampler}", code=2)
    if args.timesteps is not None:
        if args.spacing is not None:
            _fail("give --spacing or --timesteps, not both", code=2)
        try:
            args.timesteps = [int(v) for v in args.timesteps.split(",")]
        except ValueError:
            _fail(f"--timesteps must be comma-separated integers, got {args.timesteps!r}", code=2)
    args.restart_given = args.restart is not None
    try:
        args.restart = parse_restart(args.restart) if args.restart_given else None
    except ValueError as e:
        _fail(f"--restart {e}", code=2)
    if args.threshold is not None and not (args.threshold == 0 or 0 < args.threshold <= 1):
        _fail(f"--threshold must lie in (0, 1] (or 0: plain clipping), got {args.threshold}", code=2)
    if args.threshold and args.no_clip:
        _fail("--threshold rescales the clipped x0_hat: it cannot go with --no-clip", code=2)
    try:
        args.device = parse_device(args.device)
    except ValueError as e:
        _fail(str(e), code=2)
    return args


def _recorded_sampling(args, ckpt, distilled):
    """A training run's recorded grid settings (--sample-restart / --sample-threshold,
    config["train"]) as the defaults of what the command line left open: the
    threshold unless --threshold or --no-clip; the restart unless --restart, or the
    sampler or its grid was chosen, or the checkpoint is a distilled student."""
    train = (ckpt.get("config") or {}).get("train") or {}
    restart, threshold = train.get("sample_restart"), train.get("sample_threshold")
    taken = []
    if args.threshold is None:
        args.threshold = 0.0
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold <= 1 \
                and not args.no_clip:
            args.threshold = float(threshold)
            taken.append(f"--threshold {threshold:g}")
    plain_grid = (args.sampler == "ddpm" and not args.sampler_given and args.steps is None
                  and args.spacing is None and args.timesteps is None and not distilled)
    if not args.restart_given and plain_grid and isinstance(restart, (list, tuple)) and len(restart) == 3 \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in restart):
        args.restart = tuple(restart)
        taken.append("--restart {},{},{}".format(*restart))
    if taken:
        print(f"note: sampling with this run's recorded {' and '.join(taken)} (its sample grids'; "
              "--restart none --threshold 0 for the plain sampler)", file=sys.stderr)


def _option_of(msg):
    """The CLI option a make_plan error is about, as a prefix ("--order: ")."""
    for start, option in (("restart", "--restart"), ("order", "--order"), ("timesteps", "--timesteps"),
                          ("steps (", "--timesteps"), ("steps", "--steps"), ("variant", "--variant"),
                          ("unknown spacing", "--spacing")):
        if msg.startswith(start):
            return option + ": "
    return "--steps: " if "needs at least" in msg else ""


def _distilled_grid(args, ckpt):
    """A distilled student (its config["sampling"] records the grid: fastddpm.distill)
    samples on that grid with ddim unless asked otherwise; asking for another
    sampler or grid warns that it was distilled for N steps. Whether it is one."""
    rec = (ckpt.get("config") or {}).get("sampling") or {}
    grid, n = rec.get("timesteps"), rec.get("distilled_steps")
    if (not isinstance(grid, list) or not isinstance(n, int) or len(grid) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid)):
        return False
    if not args.sampler_given:
        args.sampler = rec.get("sampler", "ddim")
    same = (args.sampler == rec.get("sampler", "ddim") and not args.eta and args.spacing is None
            and (args.timesteps is None or args.timesteps == grid) and args.steps in (None, n))
    if not same:
        print(f"warning: this checkpoint was distilled for {n} steps of ddim on its grid "
              f"({','.join(map(str, grid))}); other samplers and step counts are not what it was trained for "
              "(drop --sampler/--steps/--spacing/--timesteps to use its grid)", file=sys.stderr)
    elif args.timesteps is None:
        args.timesteps = [int(v) for v in grid]
    return True


OUTPUTS = ("samples.npz", "samples.png")
LOCK = ".sample.lock"


class _OutFolder:
    """--out claimed for one sampling, as a run folder is (fastddpm.training.run_folder):
    a lock (fastddpm.files.try_lock) on --out/.sample.lock held while sampling,
    outputs of an earlier sampling refused unless overwrite. release() removes the
    lock file, and --out itself when this run created it and wrote nothing."""

    def __init__(self, out, overwrite):
        self.out, self.overwrite, self.fd, self.created = out, overwrite, None, False
        if os.path.exists(out) and not os.path.isdir(out):
            _fail(f"--out {out}: cannot write there (it is a file, not a folder)", code=2)
        self._refuse_earlier_outputs()  # before loading and sampling; again under the lock
        lock = os.path.join(out, LOCK)
        try:
            self.created = not os.path.exists(out)
            files.check_writable(out, create=True)
            fd = files.try_lock(lock)
        except files.LockError as e:  # it opened, but this file system cannot lock it (e.g. ENOLCK)
            self.release()
            _fail(f"--out {out}: cannot lock {lock} ({e.strerror or e})", code=2)
        except OSError as e:
            self.release()
            _fail(f"--out {out}: cannot write there ({e.strerror or e})", code=2)
        if fd is None:
            _fail(f"--out {out} is in use by another sampling (it holds {lock}): wait for it, "
                  "or choose another --out", code=2)
        self.fd = fd
        try:
            self._refuse_earlier_outputs()
        except SystemExit:
            self.release()
            raise
        for n in os.listdir(out):  # temp files of a sampling killed while writing
            if files.is_temp(n, OUTPUTS):
                try:
                    os.unlink(os.path.join(out, n))
                except FileNotFoundError:
                    pass

    def _refuse_earlier_outputs(self):
        held = [n for n in OUTPUTS if os.path.exists(os.path.join(self.out, n))]
        if held and not self.overwrite:
            _fail(f"--out {self.out} already holds {', '.join(held)} of an earlier sampling: choose a new --out, "
                  "or pass --overwrite to replace them", code=2)

    def release(self):
        """Unlock; remove the lock file, and --out if this run created it and it is empty."""
        if self.fd is not None:
            files.release(self.fd, os.path.join(self.out, LOCK))
            self.fd = None
        if self.created:
            try:
                os.rmdir(self.out)  # only if empty: it then holds nothing of this run
            except OSError:
                pass


def _fail(msg, code=1):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _write(out, images):
    """samples.npz and samples.png, written as one (fastddpm.files.write_all): both
    complete before either replaces its old file, so --out never pairs a new .npz
    with an old grid, nor holds a half-written file."""
    paths = [os.path.join(out, n) for n in OUTPUTS]
    try:
        files.write_all([(paths[0], lambda f: np.savez(f, arr_0=images)),
                         (paths[1], lambda f: save_grid(images[:256], f))])  # PIL reads the format from f's name
    except OSError as e:
        _fail(f"cannot write {e.filename or out}: {e.strerror or e}")
    return paths


def _check_fits(n, model):
    """Refuse an --n whose samples cannot be held in this machine's memory: they are
    kept as float32 batches, concatenated, then converted to uint8 (~9 bytes a value)."""
    cfg = model.config
    need = n * cfg.in_channels * cfg.image_size ** 2 * 9
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        _fail(f"--n {n} images of {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} need ~{need / 2**30:.1f} GiB "
              f"to hold, more than this machine's {have / 2**30:.1f} GiB: lower --n (and shard over --seed)", code=2)


def _out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


class _Stopped(BaseException):
    def __init__(self, signum):
        self.signum = signum


def _stop(signum, frame):
    raise _Stopped(signum)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    precision = args.precision or default_precision(device)
    if precision == "fp16" and device.type == "cpu":
        print("warning: fp16 on the CPU is emulated and runs many times slower than fp32 "
              "(use --precision fp32 or bf16)", file=sys.stderr)
    try:
        model, diffusion, ckpt = loader.load_for_sampling(args.checkpoint, use_ema=not args.no_ema)
    except checkpoint.CheckpointError as e:
        _fail(str(e), code=2)
    T = diffusion.num_timesteps
    _recorded_sampling(args, ckpt, distilled=_distilled_grid(args, ckpt))
    if args.steps is not None and args.steps > T:  # the one bound parse_args cannot know
        _fail(f"--steps must lie in [1, T] with T = {T} for this checkpoint, got {args.steps}", code=2)
    try:
        plan = make_plan(diffusion, args.sampler, args.steps, args.eta, args.spacing, args.variance,
                         order=args.order, variant=args.variant, timesteps=args.timesteps, restart=args.restart,
                         threshold=args.threshold)
    except ValueError as e:
        _fail(f"{_option_of(str(e))}{e}", code=2)
    _check_fits(args.n, model)
    out = _OutFolder(args.out, args.overwrite)  # the last check: nothing is written before it
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _sample_and_write(args, model, diffusion, ckpt, plan, precision)
    except _Stopped as e:
        _fail(f"stopped by {signal.Signals(e.signum).name}: no samples written", code=128 + e.signum)
    finally:
        out.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sample_and_write(args, model, diffusion, ckpt, plan, precision):
    device = args.device
    # a diffusers scheduler with clip_sample=false was trained/sampled without clipping x0_hat
    clip = not args.no_clip and (ckpt.get("config") or {}).get("sampling", {}).get("clip", True)
    if not clip and not args.no_clip:
        if args.threshold:
            _fail("--threshold rescales the clipped x0_hat, but this checkpoint's scheduler has "
                  "clip_sample=false", code=2)
        print("note: the checkpoint's scheduler has clip_sample=false: x0_hat is not clipped",
              file=sys.stderr)
    model.to(device)
    apply_memory_format(model, args.memory_format, device)
    if device.type == "cpu":
        keep_freed_memory()  # fewer page faults per step (fastddpm.allocator)
    cuda_graphs = device.type == "cuda" and not args.no_cuda_graphs and args.compile == "none"
    from fastddpm.ops import report_dispatch
    report_dispatch(model)  # on stdout, now and after the first step (stderr: errors and the result line)
    t0 = time.perf_counter()
    try:
        x = sample(compile_model(model, args.compile), diffusion, args.n, batch_size=args.batch_size,
                   seed=args.seed, device=device, precision=precision, clip=clip,
                   progress=not args.no_progress, sampler=args.sampler, steps=args.steps, eta=args.eta,
                   spacing=None if args.timesteps else plan.spacing, variance=args.variance, order=args.order,
                   variant=args.variant, timesteps=args.timesteps, restart=args.restart, threshold=args.threshold,
                   cuda_graphs=cuda_graphs)
        images = to_uint8(x)
    except NonFiniteSamplesError as e:
        _fail(f"{e} (no images written)")
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, MemoryError) or _out_of_memory(e)):
            raise
        cfg = model.config
        _fail(f"out of memory sampling batches of {min(args.batch_size, args.n)} images of {cfg.in_channels}x"
              f"{cfg.image_size}x{cfg.image_size} on {device} (no images written): lower --batch-size")
    elapsed = time.perf_counter() - t0
    npz, png = _write(args.out, images)
    # a file without an EMA copy (diffusers folders, converted ones) has one set of weights
    weights = "the file's only weights" if ckpt.get("ema") is None else "raw weights" if args.no_ema else "EMA weights"
    step = "" if ckpt.get("step") is None else f", step {ckpt['step']}"
    print(f"{args.n} samples ({weights}{step}, {plan.describe()}, {precision}, "
          f"{device}{', CUDA graphs' if cuda_graphs else ''}) in {elapsed:.1f}s -> {png}, {npz}",
          file=sys.stderr)


if __name__ == "__main__":
    from fastddpm.files import tolerate_closed_stdout
    tolerate_closed_stdout()  # `... | head` must not cost the files being written
    main()
