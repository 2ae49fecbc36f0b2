"""Train a DDPM: `python -m fastddpm.train --preset tiny` (CPU demo, minutes) or
`--preset cifar10` (the paper), single process or under torchrun.

    python -m fastddpm.train --preset tiny --out runs/tiny
    python -m fastddpm.train --preset cifar10 --data cifar-10-batches-py --out runs/cifar10
    python -m fastddpm.train --resume runs/cifar10                 # continue a run
    torchrun --nproc_per_node=8 -m fastddpm.train --preset cifar10 --data ... --out ...

Everything a run does is a function of its TrainConfig (saved as config.json
beside the checkpoints and inside each checkpoint) and the step:
  * the data order: epoch permutations from (seed, epoch), global batch j takes
    positions [jB, (j+1)B), rank r of W its r-th slice (fastddpm.data);
  * the timesteps, noise and flips of step s: drawn for the whole global batch
    from a generator seeded with (seed, s), each rank keeping its slice;
  * dropout: the global torch RNG, seeded per rank and saved in checkpoints.
So a run stopped at step k and resumed is bit-identical on the CPU to one that
never stopped, and it can resume on a different number of ranks.

A run folder (--out) belongs to one run: a trainer holds a lock on it
(.lock, a POSIX fcntl.lockf lock: held by the trainer process alone, so data-loader
workers it forked never keep it after a kill) while it runs; a new run, or a resumed one continuing in a
new folder, is refused a folder that holds checkpoints or metrics of another
run; a run resumes in its own folder only from its newest checkpoint (branch
from an older one with --out NEW). Keep-N pruning deletes only older
checkpoints of the folder's own run. metrics.jsonl is cut, on resume, to the
complete records up to the step resumed from; each record says how many steps
its window covers (window_steps). SIGINT/SIGTERM, to the trainer alone or to
its whole process group, save a checkpoint and exit 128 + the signal (a sample
grid or in-training FID in progress is abandoned at its next network call; under
torchrun the ranks agree at log steps). Under torchrun a failure in what rank 0 alone
does (claiming the run folder, writing a checkpoint, a sample grid or metrics.jsonl)
stops every rank with one line each (Trainer.on_rank0), not a traceback from a
collective that rank 0 has left.

The training step is small and free of host synchronisation: non-finite
gradients skip the optimizer step and the EMA update on the device (fused Adam
reads a found_inf flag; fp16 uses torch.amp.GradScaler, which does the same),
and the counters are read only every --log-every steps.
"""
import argparse
import copy
import dataclasses
import hashlib
import errno
import fcntl
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from fastddpm import checkpoint as ckpt_io
from fastddpm import data as data_mod
from fastddpm.allocator import keep_freed_memory
from fastddpm.checkpoint import CheckpointError
from fastddpm.diffusion import SCHEDULES, GaussianDiffusion
from fastddpm.sampling import (COMPILE_MODES, MAX_SEED, MEMORY_FORMATS, PRECISIONS, apply_memory_format, autocast,
                               compile_model, default_precision)
from fastddpm.unet import UNet, UNetConfig

_NET = UNetConfig()


# ---- configuration -------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the paper's CIFAR-10 run."""
    preset: str = "cifar10"
    data: Optional[str] = None
    image_size: int = 32
    out: Optional[str] = None
    # the network: UNetConfig's fields, its defaults (the paper's network)
    ch: int = _NET.ch
    ch_mult: tuple = _NET.ch_mult
    num_res_blocks: int = _NET.num_res_blocks
    attn_resolutions: tuple = _NET.attn_resolutions
    dropout: float = _NET.dropout
    num_groups: int = _NET.num_groups
    # the diffusion
    schedule: str = "linear"
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "fixedlarge"
    # optimisation
    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    flip: bool = True
    precision: Optional[str] = None
    device: Optional[str] = None
    tf32: bool = True
    compile: str = "none"
    memory_format: str = "auto"  # a runtime choice: not part of RUN_IDENTITY
    seed: int = 0
    max_nonfinite: int = 50
    # bookkeeping
    ckpt_every: int = 10_000
    keep: int = 3
    sample_every: int = 50_000
    sample_n: int = 64
    sample_batch: int = 256
    fid_every: int = 0
    fid_n: int = 5000
    fid_ref: Optional[str] = None
    log_every: int = 100
    workers: int = 4
    threads: int = 0
    progress: bool = True

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {sorted(unknown)}")
        d = dict(d)
        for k in ("ch_mult", "attn_resolutions"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def model_config(self, in_channels=3):
        return UNetConfig(image_size=self.image_size, in_channels=in_channels, ch=self.ch,
                          ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                          attn_resolutions=self.attn_resolutions, dropout=self.dropout,
                          num_groups=self.num_groups)

    def diffusion_config(self):
        return {"schedule": self.schedule, "T": self.T, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "variance": self.variance}


def _usable_cpus():
    """CPUs this process may run on (its affinity mask, e.g. a container's), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


PRESETS = {
    # Ho et al. 2020, CIFAR-10: the TrainConfig defaults.
    "cifar10": {},
    # 2 CPU cores, embedded 16x16 shapes, samples with visible structure in under 10
    # minutes. Compute threads: one per core but one (the data worker's), at most 8: an
    # OpenMP thread per core of a 2-core machine ran up to 10x slower whenever anything
    # else was busy, while a second thread on an idle one gained only ~17%.
    "tiny": dict(image_size=16, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, num_groups=8, T=500, beta_start=2e-4, beta_end=0.04, steps=1500,
                 batch_size=32, lr=2e-3, warmup=100, ema_decay=0.995, ckpt_every=500, sample_every=0, sample_n=36,
                 sample_batch=36, log_every=25, workers=1,
                 threads=max(1, min(8, _usable_cpus() - 1))),
}

# Changing these on resume would make a different run: refused.
RUN_IDENTITY = ("image_size", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                "num_groups", "schedule", "T", "beta_start", "beta_end", "batch_size", "seed")


def preset_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return TrainConfig(preset=name, **PRESETS[name])


def _int(s):
    try:
        return int(s)
    except ValueError:  # else argparse names the parser function: "invalid parse value"
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _ints(s):
    s = s.strip()
    try:
        return tuple(int(v) for v in s.replace(" ", "").split(",") if v) if s else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _finite(s):
    """A float flag: a finite number (inf and nan would only surface later, as a nan loss)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v


def _positive(kind):
    def parse(s):
        v = _finite(s) if kind is float else _int(s)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def _nonneg_int(s):
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


SEED_MAX = MAX_SEED  # the samplers' range: sample grids and in-training FID use the run's seed


def _seed(s):
    v = _int(s)
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {s}")
    return v


# (flag, field, type, help). Defaults come from the preset (shown in --help).
_FLAGS = [
    ("--data", "data", str, "training images: a CIFAR-10 'python version' folder (data_batch_1..5), "
     "a folder of PNG/JPEG images (resized + centre-cropped to --image-size), or an .npz of uint8 "
     "NHWC images; default: the embedded 16x16 shapes dataset"),
    ("--out", "out", str, "run folder for checkpoints, config.json, metrics.jsonl and sample grids "
     "(default runs/<preset>; with --resume, the resumed folder)"),
    ("--image-size", "image_size", _positive(int), "training resolution; data of another size is resized"),
    ("--ch", "ch", _positive(int), "UNet base channels"),
    ("--ch-mult", "ch_mult", _ints, "UNet channel multipliers per resolution, comma separated"),
    ("--num-res-blocks", "num_res_blocks", _nonneg_int, "residual blocks per resolution"),
    ("--attn-resolutions", "attn_resolutions", _ints, "resolutions with self-attention, comma separated ('' for none)"),
    ("--dropout", "dropout", _finite, "dropout rate in the residual blocks"),
    ("--num-groups", "num_groups", _positive(int), "GroupNorm groups"),
    ("--schedule", "schedule", str, "beta schedule: " + " | ".join(SCHEDULES) + " (cosine: Nichol & "
     "Dhariwal 2021; ignores --beta-start/--beta-end)"),
    ("--T", "T", _positive(int), "diffusion steps"),
    ("--beta-start", "beta_start", _finite, "first beta of the linear schedule"),
    ("--beta-end", "beta_end", _finite, "last beta of the linear schedule"),
    ("--variance", "variance", str, "sampling variance: fixedlarge (beta_t) or fixedsmall (posterior); "
     "it only affects sampling, so it may change on --resume (recorded in config.json and the "
     "checkpoints written from then on)"),
    ("--steps", "steps", _positive(int), "total optimizer steps of the run (on resume: the new total)"),
    ("--batch-size", "batch_size", _positive(int), "global batch size, split evenly over the ranks"),
    ("--lr", "lr", _positive(float), "Adam learning rate after warm-up"),
    ("--warmup", "warmup", _nonneg_int, "linear learning-rate warm-up steps (lr * min(step/warmup, 1))"),
    ("--grad-clip", "grad_clip", _positive(float), "clip the global gradient norm to this value"),
    ("--ema-decay", "ema_decay", _finite, "EMA decay of the weights used for sampling"),
    ("--precision", "precision", str, "fp32 | bf16 | fp16 (autocast; fp16 with dynamic loss scaling); "
     "default bf16 on a GPU that supports it, else fp32"),
    ("--device", "device", str, "cpu, cuda or cuda:N (default: cuda if available; under torchrun "
     "each rank uses cuda:LOCAL_RANK)"),
    ("--compile", "compile", str, "torch.compile the network for training: " + " | ".join(COMPILE_MODES)
     + " (reduce-overhead: CUDA graphs); the first steps pay the compilation"),
    ("--memory-format", "memory_format", str, "layout the network runs in: " + " | ".join(MEMORY_FORMATS)
     + "; auto = channels_last on the CPU when the C++ extension fastddpm._C is loaded and the backend "
     "(FASTDDPM_BACKEND) is auto or cpp, else contiguous (always contiguous on CUDA for now). "
     "Checkpoints are the same either way, so it may change on --resume"),
    ("--seed", "seed", _seed, "seed of the weights, data order, noise and dropout"),
    ("--max-nonfinite", "max_nonfinite", _positive(int), "stop after this many consecutive steps "
     "with a non-finite loss or gradient (each is skipped and counted)"),
    ("--ckpt-every", "ckpt_every", _nonneg_int, "checkpoint every N steps (0: only at the end and on "
     "SIGINT/SIGTERM)"),
    ("--keep", "keep", _positive(int), "keep the last K checkpoints"),
    ("--sample-every", "sample_every", _nonneg_int, "write a PNG grid of EMA samples every N steps "
     "(0: only at the end)"),
    ("--sample-n", "sample_n", _nonneg_int, "images in each sample grid (0: no grids)"),
    ("--sample-batch", "sample_batch", _positive(int), "batch size when sampling"),
    ("--fid-every", "fid_every", _nonneg_int, "FID of --fid-n EMA samples against --fid-ref every N steps "
     "(0: never), into metrics.jsonl and the progress output (Inception weights as for fastddpm.evaluate: "
     "$FASTDDPM_INCEPTION or found by itself), sampling with DPM-Solver++(2M) at 20 steps. Cost: "
     "sampling fid_n images (fid_n x 20 network evaluations) + fid_n fp32 Inception passes + ~5-10 s for the FID; measured on the busy 2-core CPU "
     "(1 thread, 2026-12-01): ~2.4 ms per network evaluation per image on the tiny preset (1.2 s/image for its 500 ancestral steps), ~0.4 s/image Inception"),
    ("--fid-n", "fid_n", _positive(int), "samples per in-training FID (FID grows as n shrinks: compare equal n)"),
    ("--fid-ref", "fid_ref", str, "reference statistics .npz for --fid-every (python -m fastddpm.evaluate "
     "stats DATA --out ref.npz)"),
    ("--log-every", "log_every", _positive(int), "log (tqdm, metrics.jsonl) every N steps; counters "
     "are read from the device only then"),
    ("--workers", "workers", _nonneg_int, "DataLoader worker processes"),
    ("--threads", "threads", _nonneg_int, "CPU threads for torch ops (0: torch's default); 1 is "
     "faster on a busy machine"),
]


def build_parser():
    epilog = "presets (a flag overrides its preset value):\n" + "\n".join(
        f"  {name}: " + (", ".join(f"{k}={v}" for k, v in over.items()) or "the paper's CIFAR-10 run "
                         "(the defaults shown above)")
        for name, over in PRESETS.items())
    p = argparse.ArgumentParser(
        prog="python -m fastddpm.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        argument_default=argparse.SUPPRESS)
    base = TrainConfig()
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="starting configuration: cifar10 (the paper, default) or tiny (CPU demo)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR (its newest checkpoint; a file also works) with its "
                   "saved config; flags given now override it, except ones that would change the run: "
                   "the network, the beta schedule and T, the data, the batch size and the seed are "
                   "refused (--variance, which only affects sampling, is allowed). With --out NEW the "
                   "run continues in NEW, which must hold no other run; an older checkpoint of a folder "
                   "that holds newer ones can only be resumed that way")
    for flag, name, typ, text in _FLAGS:
        default = getattr(base, name)
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        p.add_argument(flag, dest=name, type=typ, metavar=name.upper(),
                       help=f"{text} (cifar10: {default})")
    p.add_argument("--flip", dest="flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips (cifar10: on)")
    p.add_argument("--tf32", dest="tf32", action=argparse.BooleanOptionalAction,
                   help="allow TF32 matmuls/convolutions for fp32 on CUDA (default on)")
    p.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction,
                   help="show the tqdm progress bar (default on)")
    return p


def config_from_args(argv=None):
    """(TrainConfig, resume checkpoint dict or None, resume path or None) from the command line."""
    given = vars(build_parser().parse_args(argv))
    resume = given.pop("resume", None)
    preset = given.pop("preset", None)
    if resume is None:
        cfg = dataclasses.replace(preset_config(preset or "cifar10"), **given)
        if cfg.out is None:
            cfg.out = os.path.join("runs", cfg.preset)
        if cfg.data:
            cfg.data = os.path.abspath(cfg.data)
        _validated(cfg)
        check_out_folder(cfg.out)
        return cfg, None, None
    path = ckpt_io.resolve(resume)
    ckpt = ckpt_io.load(path)
    saved_train = (ckpt.get("config") or {}).get("train")
    if saved_train is None or "train_state" not in ckpt:
        raise CheckpointError(f"{path} holds no training state (not written by fastddpm.train); "
                              "it can be sampled from but not resumed")
    saved = TrainConfig.from_dict(saved_train)
    base = preset_config(preset) if preset is not None and preset != saved.preset else saved
    if preset is not None and preset != saved.preset:
        base = dataclasses.replace(base, out=saved.out, data=saved.data)
    cfg = dataclasses.replace(base, **given)
    if "data" in given and cfg.data:
        cfg.data = os.path.abspath(cfg.data)
    if "out" not in given:
        cfg.out = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(path))
    check_resumable(saved, cfg, path)
    _validated(cfg)
    check_out_folder(cfg.out, path, int(ckpt["step"]))
    return cfg, ckpt, path


def check_resumable(saved: TrainConfig, cfg: TrainConfig, path):
    diff = [f"{k}: checkpoint {getattr(saved, k)!r}, now {getattr(cfg, k)!r}"
            for k in RUN_IDENTITY if getattr(saved, k) != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"cannot resume from {path}: it was written by a different "
                              "configuration (" + "; ".join(diff) + "). Start a new run in another "
                              "--out folder, or drop the flags that change it.")


class RunFolderError(ValueError):
    """--out cannot be used: not a writable folder, in use, or holding another run."""


def _check_out_path(out):
    """--out is, or can be created as, a writable folder (checked before anything is written)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"--out {out} is a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunFolderError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out}: {parent} is not writable")


def _same_folder(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def check_out_folder(out, resume_path=None, resume_step=None):
    """Refuse a run folder where writing would touch another run's files.

    A folder holds a run when it has checkpoints or a non-empty metrics.jsonl.
    A new run, or a resumed one continuing in a new folder, needs one that holds
    none. A run resumed in its own folder must resume its newest checkpoint:
    resuming an older one there would leave the newer ones (another future of the
    run) to be pruned or resumed by mistake, so branching needs a new --out."""
    _check_out_path(out)
    ckpts = ckpt_io.list_checkpoints(out)
    if resume_path is not None and _same_folder(os.path.dirname(os.path.abspath(resume_path)), out):
        newer = [os.path.basename(p) for s, p in ckpts if s > resume_step]
        if newer:
            raise RunFolderError(
                f"cannot resume {resume_path} (step {resume_step}) in {out}: the folder holds newer "
                f"checkpoints of the run ({', '.join(newer)}), which resuming there would discard. "
                f"Continue the newest with --resume {out}, or branch from step {resume_step} into a "
                "new folder with --out NEW")
        return
    metrics = os.path.join(out, "metrics.jsonl")
    held = [f"{len(ckpts)} checkpoint(s)"] if ckpts else []
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        held.append("metrics.jsonl")
    if not held:
        return
    if resume_path is None and not ckpts:  # nothing to resume: --resume would only fail
        raise RunFolderError(f"{out} already holds a run that wrote no checkpoint (metrics.jsonl): "
                             "choose another --out folder, or remove its metrics.jsonl to reuse it")
    if resume_path is None:
        raise RunFolderError(f"{out} already holds a run ({', '.join(held)}): continue it with "
                             f"--resume {out}, or choose another --out folder")
    raise RunFolderError(f"cannot resume {resume_path} into {out}: that folder holds another run "
                         f"({', '.join(held)}); choose a new or empty --out folder")


def _validated(cfg: TrainConfig):
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {tuple(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.compile not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {COMPILE_MODES}, got {cfg.compile!r}")
    if cfg.memory_format not in MEMORY_FORMATS:
        raise ValueError(f"--memory-format must be one of {MEMORY_FORMATS}, got {cfg.memory_format!r}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.variance not in ("fixedlarge", "fixedsmall"):
        raise ValueError(f"--variance must be fixedlarge or fixedsmall, got {cfg.variance!r}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0 < cfg.beta_start <= cfg.beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {cfg.beta_start}, {cfg.beta_end}")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ValueError(f"--seed must be in [0, 2**63 - 1], got {cfg.seed}")
    if cfg.device is not None:
        try:
            dev = torch.device(cfg.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {cfg.device!r} is not a device (cpu, cuda or cuda:N)") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {cfg.device}: fastddpm trains on cpu or cuda (cuda:N), not {dev.type}")
    cfg.model_config()  # UNetConfig validates the network fields
    if cfg.fid_every:
        from fastddpm.evaluate import check_training_fid
        check_training_fid(cfg)  # ref stats and Inception weights usable: fail now, not hours in
    return cfg


# ---- helpers -------------------------------------------------------------------------

def _mix(seed, step, stream):
    """A 63-bit seed for (seed, step, stream)."""
    h = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def rng_state():
    """The process's RNG states as tensors and plain ints (checkpoints load with
    weights_only=True, which refuses numpy arrays and arbitrary objects)."""
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rngs(seed, rank):
    s = _mix(seed, rank, "process")
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


def lr_at(cfg, step):
    """The paper's warm-up: lr * min(step / warmup, 1), step = updates done so far."""
    return cfg.lr * (min(step / cfg.warmup, 1.0) if cfg.warmup > 0 else 1.0)


def _contiguous(state):
    """`state` (nested dicts/lists of tensors) with every tensor in plain row-major
    strides, so that checkpoints do not depend on the layout the network ran in
    (--memory-format). Not .contiguous(): a channels_last (C, K, 1, 1) weight already
    counts as contiguous but keeps strides (K, 1, K, K)."""
    if torch.is_tensor(state):
        plain = state.stride() == torch.empty(state.shape, device="meta").stride()
        return state if plain else state.clone(memory_format=torch.contiguous_format)
    if isinstance(state, dict):
        return {k: _contiguous(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_contiguous(v) for v in state)
    return state


def params_digest(model):
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        # flatten(): a channels_last (C, K, 1, 1) weight is "contiguous" with stride(-1) == K
        h.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class _SamplingStopped(Exception):
    """A stop signal arrived while writing a sample grid or scoring an in-training FID."""


class PeerFailed(RuntimeError):
    """Under torchrun: rank 0 failed in work only it does (its run folder, a checkpoint
    write, a sample grid, metrics.jsonl); the other ranks stop with this instead of
    failing later in a collective that rank 0 has left."""


class Stopped(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {path}")
        self.signum, self.step, self.path = signum, step, path


# ---- the trainer ---------------------------------------------------------------------

class Trainer:
    """UNet + GaussianDiffusion + data + Adam + EMA, one process of a (possibly
    distributed) run. `resume`: a loaded checkpoint dict to continue from, read
    from `resume_path`. train() (or prepare_out() first) takes the run folder's
    lock; close() releases it (main does)."""

    def __init__(self, cfg: TrainConfig, resume=None, rank=0, world=1, log=print, resume_path=None):
        self.cfg, self.rank, self.world, self.log = cfg, rank, world, log
        self.resume_path = resume_path
        self._lock = None  # the run folder's lock file (rank 0), held while training
        self.device = self._pick_device(cfg.device)
        self.precision = cfg.precision or default_precision(self.device)
        self._warn_slow_settings()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")

        self.dataset = data_mod.open_dataset(cfg.data, cfg.image_size)
        if getattr(self.dataset, "transparent", 0) and rank == 0:
            log(f"fastddpm.train: {self.dataset.transparent} of {len(self.dataset)} images have "
                "transparency: composited onto white (see fastddpm.data)")
        self.in_channels = self.dataset.image_shape[2]
        self.fingerprint = self.dataset.fingerprint()
        if len(self.dataset) < cfg.batch_size:
            raise data_mod.DataError(f"{cfg.data or 'embedded dataset'}: {len(self.dataset)} images, "
                                     f"fewer than the batch size {cfg.batch_size}")
        self.model_config = cfg.model_config(self.in_channels)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = UNet(self.model_config).to(self.device)
        self.memory_format = apply_memory_format(self.model, cfg.memory_format, self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion_config()).to(self.device)
        self.params = [p for p in self.model.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=lr_at(cfg, 0), fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self._counters = torch.zeros(3, dtype=torch.int64, device=self.device)  # skipped, streak, max streak
        self._window = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, gnorm sum, finite n
        self._gen = torch.Generator(device=self.device)
        seed_rngs(cfg.seed, rank)
        if resume is not None:
            self._load(resume)
        self.net = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = compile_model(self.net, cfg.compile)  # checkpoints and the EMA use self.model
        self.signal = None  # set by SIGINT/SIGTERM handlers

    # -- setup --
    def _warn_slow_settings(self):
        """One line on stderr for settings that run but are far slower than the alternative."""
        if self.rank != 0:
            return
        warn = lambda m: print(f"fastddpm.train: warning: {m}", file=sys.stderr)  # noqa: E731
        cores = _usable_cpus()
        if self.cfg.threads > cores:
            warn(f"--threads {self.cfg.threads} is more than the {cores} CPU cores this process may "
                 "use; oversubscribed compute threads wait on each other and can run orders of "
                 f"magnitude slower: use --threads {cores} or fewer (0: torch's default)")
        if self.device.type == "cpu" and self.precision == "fp16":
            warn("--precision fp16 on the CPU has no fast kernels and runs many times slower than "
                 "fp32: use --precision fp32 (or bf16 on a CPU with native bf16 support)")

    def _pick_device(self, name):
        if name is None:
            if torch.cuda.is_available():
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            return torch.device("cpu")
        dev = torch.device(name)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {name}: CUDA is not available in this torch/machine")
            if dev.index is None:
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s)")
        return dev

    def _autocast(self):
        return autocast(self.device, self.precision)

    # -- the step --
    def draw(self, step):
        """Timesteps, noise and flips of global step `step` for this rank's slice."""
        B, b = self.cfg.batch_size, self.cfg.batch_size // self.world
        S, C = self.cfg.image_size, self.in_channels
        g = self._gen.manual_seed(_mix(self.cfg.seed, step, "batch"))
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g, device=self.device)
        noise = torch.randn((B, C, S, S), generator=g, device=self.device)
        flip = torch.rand((B,), generator=g, device=self.device) < 0.5
        sl = slice(self.rank * b, (self.rank + 1) * b)
        return t[sl], noise[sl], flip[sl]

    def train_step(self, batch_uint8, t, noise, flip, lr):
        """One optimizer step on this rank's uint8 batch; no host synchronisation."""
        x0 = data_mod.to_model_input(batch_uint8, self.device, flip if self.cfg.flip else None)
        if self.cfg.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs are done
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.diffusion.training_loss(self.net, x0, t, noise, check_t=False)  # t drawn in range
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        finite = torch.isfinite(gnorm)  # grads are all-reduced: the same on every rank
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)  # skips on the device when the grads were not finite
            self.scaler.update()
        else:
            self.opt.found_inf = (~finite).float()  # fused Adam: no update where found_inf == 1
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
        self._ema_update(finite)
        nf = (~finite).long()
        c = self._counters
        c[0] += nf
        c[1] = (c[1] + 1) * nf
        c[2] = torch.maximum(c[2], c[1])
        loss = loss.detach().double()
        lossf = torch.isfinite(loss)
        self._window += torch.stack([torch.where(lossf, loss, 0.0), torch.where(finite, gnorm.double(), 0.0),
                                     (lossf & finite).double()])

    @torch.no_grad()
    def _ema_update(self, finite):
        """ema -= (1 - decay) * (ema - w), as tf.train.ExponentialMovingAverage; skipped steps keep it."""
        rate = torch.where(finite, 1.0 - self.cfg.ema_decay, 0.0).float()
        diff = torch._foreach_sub(self.ema_params, self.params)
        torch._foreach_mul_(diff, rate)
        torch._foreach_sub_(self.ema_params, diff)

    # -- state --
    def state_dict(self):
        """The checkpoint dict (see fastddpm.checkpoint); call on every rank (gathers RNG states)."""
        rng = rng_state()
        digest = params_digest(self.model)
        if self.world > 1:
            rngs, digests = [None] * self.world, [None] * self.world
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(digests, digest)
        else:
            rngs, digests = [rng], [digest]
        sampler = data_mod.ShardedBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed,
                                               self.step, self.step)
        epoch, position = sampler.position(self.step)
        counters = self._counters.tolist()
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": self.step,
            "config": self.config_dict(),
            "model": _contiguous(self.model.state_dict()),
            "ema": _contiguous(self.ema.state_dict()),
            "train_state": {
                "optimizer": _contiguous(self.opt.state_dict()),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "data": {"seed": self.cfg.seed, "epoch": epoch, "position": position,
                         "steps_per_epoch": sampler.steps_per_epoch, "global_batch": self.cfg.batch_size,
                         "size": len(self.dataset), "image_shape": list(self.dataset.image_shape),
                         "fingerprint": self.fingerprint, "source": self.dataset.source},
                "counters": {"skipped": counters[0], "streak": counters[1]},
                "world_size": self.world,
                "param_digest_per_rank": digests,
            },
        }

    def config_dict(self):
        """The effective config: network, diffusion, the TrainConfig (device and precision as
        given, None meaning automatic) and what they resolved to in this run."""
        return {"model": self.model_config.to_dict(), "diffusion": self.diffusion.config,
                "train": self.cfg.to_dict(),
                "runtime": {"device": str(self.device), "precision": self.precision,
                            "memory_format": str(self.memory_format).removeprefix("torch."),
                            "world_size": self.world, "torch": torch.__version__}}

    def _load(self, ckpt):
        where = f"checkpoint at step {ckpt.get('step')}"
        cfg = ckpt.get("config") or {}
        if cfg.get("model") != self.model_config.to_dict():
            raise CheckpointError(f"{where}: its network {cfg.get('model')} differs from this run's "
                                  f"{self.model_config.to_dict()}")
        ts = ckpt["train_state"]
        d = ts["data"]
        if (d["size"], list(d["image_shape"]), d["fingerprint"]) != (
                len(self.dataset), list(self.dataset.image_shape), self.fingerprint):
            raise CheckpointError(f"{where}: it was trained on other data ({d['source']}: {d['size']} "
                                  f"images {d['image_shape']}, fingerprint {d['fingerprint']}); now "
                                  f"{self.dataset.source}: {len(self.dataset)} images "
                                  f"{list(self.dataset.image_shape)}, fingerprint {self.fingerprint}")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ts["optimizer"])
        # Checkpoints hold contiguous tensors; fused Adam reads its state in the
        # parameter's memory order (a channels_last parameter with contiguous
        # moments is updated wrongly, silently), so give each moment p's strides.
        for p, st in self.opt.state.items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        if self.scaler.is_enabled() and ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        self.step = int(ckpt["step"])
        self._counters = torch.tensor([ts["counters"]["skipped"], ts["counters"]["streak"],
                                       ts["counters"]["streak"]], dtype=torch.int64, device=self.device)
        rngs = ts["rng"]
        if self.rank < len(rngs):
            set_rng_state(rngs[self.rank])
        else:  # more ranks than the run that wrote it: fresh streams for the new ranks
            seed_rngs(_mix(self.cfg.seed, self.step, "resume"), self.rank)

    # -- reading the counters (every log_every steps) --
    def read_window(self):
        """Host copy of the window stats (summed over ranks) and counters; resets the window."""
        w = self._window.clone()
        if self.world > 1:
            dist.all_reduce(w)
        loss_sum, gn_sum, n = w.tolist()
        skipped, streak, max_streak = self._counters.tolist()
        self._window.zero_()
        n_local = n / self.world
        return {"loss": loss_sum / n if n else float("nan"), "grad_norm": gn_sum / self.world / n_local
                if n_local else float("nan"), "skipped": int(skipped), "streak": int(streak),
                "max_streak": int(max_streak)}

    def check_finite_streak(self, stats=None):
        """Raise TrainingDiverged after --max-nonfinite consecutive skipped steps."""
        if stats is None:
            skipped, streak, max_streak = self._counters.tolist()
            stats = {"skipped": skipped, "streak": streak, "max_streak": max_streak}
        if stats["max_streak"] >= self.cfg.max_nonfinite:
            raise TrainingDiverged(
                f"training stopped at step {self.step}: {stats['max_streak']} consecutive steps had a "
                f"non-finite loss or gradient (--max-nonfinite {self.cfg.max_nonfinite}; {stats['skipped']} "
                f"skipped in all; precision {self.precision}"
                + (f", loss scale {self.scaler.get_scale():g}" if self.scaler.is_enabled() else "")
                + "). Skipped steps do not change the weights; the last checkpoint is intact. "
                "Try a lower --lr, --precision bf16/fp32, or a larger --grad-clip warm-up.")

    def stop_requested(self, sync):
        """Whether a SIGINT/SIGTERM arrived (on any rank: agreed at sync points under torchrun)."""
        if self.world == 1:
            return self.signal is not None
        if not sync:
            return False
        flag = torch.tensor([0 if self.signal is None else int(self.signal)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal is None:
            self.signal = int(flag.item())
        return bool(flag.item())

    # -- the loop --
    def on_rank0(self, fn):
        """fn() on rank 0 only; under torchrun every rank then learns (one broadcast, which
        also makes it a barrier) whether it raised: rank 0 re-raises its error, the other
        ranks raise PeerFailed. Returns fn's value on rank 0, None elsewhere."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001  (re-raised below, after the others know)
                error = e
        if self.world > 1:
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            if self.rank != 0 and box[0] is not None:
                raise PeerFailed(f"rank 0 failed: {box[0]}")
        if error is not None:
            raise error
        return result

    def save(self):
        """Checkpoint (all ranks take part, rank 0 writes); returns the path."""
        state = self.state_dict()
        path = os.path.join(self.cfg.out, ckpt_io.checkpoint_name(self.step))

        def write():
            ckpt_io.atomic_save(state, path)  # a failed write is a CheckpointError naming the file
            for step, old in ckpt_io.list_checkpoints(self.cfg.out)[:-self.cfg.keep]:
                if step < self.step:  # never a newer one (check_out_folder keeps them out anyway)
                    try:
                        os.unlink(old)
                    except FileNotFoundError:
                        pass
        self.on_rank0(write)
        return path

    def stop_check(self):
        """For sampling and scoring between steps (sample grids, in-training FID): a
        callable that raises _SamplingStopped once a SIGINT/SIGTERM has arrived, so the
        stop comes at the next network call, not minutes later. None under torchrun,
        where the ranks agree on a stop at sync points."""
        if self.world > 1:
            return None

        def check():
            if self.signal is not None:
                raise _SamplingStopped
        return check

    def _stop_now(self, last_ckpt):
        """Stopped at the current step, saving it unless last_ckpt already holds it."""
        path = last_ckpt[1] if last_ckpt and last_ckpt[0] == self.step else self.save()
        return Stopped(self.signal, self.step, path)

    def write_samples(self):
        """A PNG grid of EMA samples (rank 0); returns the path or None."""
        if self.rank != 0 or self.cfg.sample_n <= 0:
            return None
        from fastddpm.images import save_grid, to_uint8
        from fastddpm.sampling import before_each_call, sample

        with before_each_call(self.stop_check(), self.ema):
            x = sample(self.ema, self.diffusion, self.cfg.sample_n, batch_size=self.cfg.sample_batch,
                       seed=self.cfg.seed, device=self.device, precision=self.precision, progress=False)
        path = os.path.join(self.cfg.out, f"samples-{self.step:08d}.png")
        save_grid(to_uint8(x), path)
        return path

    def prepare_out(self):
        """Claim the run folder (rank 0; once): create it, lock it for the whole run (a
        second trainer on it gets a RunFolderError), check again under the lock that it
        holds no other run, remove temp files of killed writes, write config.json and cut
        metrics.jsonl to the records of this run up to the step it starts from."""
        cfg = self.cfg
        if self.rank != 0 or self._lock is not None:
            return
        lock = os.path.join(cfg.out, ".lock")
        try:
            os.makedirs(cfg.out, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from e
        try:
            # lockf, not flock: a flock is shared with every forked DataLoader worker and
            # outlives a SIGKILLed trainer until they exit; a POSIX lock dies with the process
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"cannot lock {lock}: {e.strerror or e}") from e
            raise RunFolderError(f"{cfg.out} is in use by another trainer (it holds {lock}): wait for "
                                 "it to finish, or choose another --out folder") from None
        self._lock = fd
        try:
            check_out_folder(cfg.out, self.resume_path, self.step if self.resume_path else None)
        except BaseException:
            self.close()
            raise
        for n in os.listdir(cfg.out):  # temp files of writes killed half-way
            if n.startswith(".tmp-") and n.endswith(".pt"):
                try:
                    os.unlink(os.path.join(cfg.out, n))
                except FileNotFoundError:
                    pass
        _write_atomic(os.path.join(cfg.out, "config.json"), json.dumps(self.config_dict(), indent=2) + "\n")
        metrics = os.path.join(cfg.out, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                lines = f.read().split("\n")
            # lines[-1] is "" or a record torn by a kill; drop it and records past our step
            kept = [ln + "\n" for ln in lines[:-1] if (st := _record_step(ln)) is not None and st <= self.step]
            _write_atomic(metrics, "".join(kept))

    def close(self):
        """Release the run folder's lock."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _data_error(self, e, start_step, last_ckpt):
        """A DataError met while training, after saving the steps done (single process)."""
        path = last_ckpt[1] if last_ckpt and last_ckpt[0] == self.step else None
        if path is None and self.world == 1 and self.step > start_step:
            path = self.save()
        then = (f"checkpoint {path} written; repair or replace the file (removing it makes other data, "
                f"a new run), then continue with --resume {self.cfg.out}" if path else
                f"no step trained since step {start_step}, nothing new saved; repair or replace the file")
        return data_mod.DataError(f"{e} (training stopped at step {self.step}; {then})")

    def _save_after_error(self, e, start_step, last_ckpt):
        """Checkpoint the steps done before an unexpected error between steps (logging, a
        sample grid, in-training FID) propagates, and say so in a note on e. Not for errors
        that handle their own checkpoint (a stop, a divergence, a failed write, bad data), and
        single process only: under torchrun the other ranks would wait in the save's
        collectives."""
        if (isinstance(e, (Stopped, TrainingDiverged, CheckpointError, data_mod.DataError))
                or self.world > 1 or self.step == start_step):
            return
        if last_ckpt and last_ckpt[0] == self.step:
            path = last_ckpt[1]
        else:
            try:
                self.check_finite_streak()  # never checkpoint past a divergence
                path = self.save()
            except Exception as e2:
                e.add_note(f"fastddpm.train: no checkpoint written at step {self.step}: {e2}")
                return
        e.add_note(f"fastddpm.train: checkpoint {path} written at step {self.step}; continue with "
                   f"--resume {self.cfg.out}")

    def train(self):
        """Run to cfg.steps. Returns a summary dict; raises TrainingDiverged, Stopped, DataError
        (an unreadable image, after saving), CheckpointError or OSError (a failed write); any
        other error between steps propagates after a checkpoint of the steps done."""
        from tqdm.auto import tqdm

        cfg, rank = self.cfg, self.rank
        self.on_rank0(self.prepare_out)
        sampler = data_mod.ShardedBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed,
                                               self.step, cfg.steps, rank, self.world)
        loader = data_mod.make_loader(self.dataset, sampler, cfg.workers, self.device.type == "cuda",
                                       seed=cfg.seed)
        start_step, t_start = self.step, time.perf_counter()
        train_time, window_steps, last_ckpt, last_samples = 0.0, 0, None, None
        metrics = self.on_rank0(lambda: open(os.path.join(cfg.out, "metrics.jsonl"), "a"))  # rank 0: a file
        bar = tqdm(total=cfg.steps, initial=self.step, disable=rank != 0 or not cfg.progress,
                   desc="train", unit="step", dynamic_ncols=True, smoothing=0.05)
        stats = {"loss": float("nan"), "skipped": int(self._counters[0])}
        it = iter(loader)
        t0, paused, in_step = time.perf_counter(), 0.0, False
        try:
            while self.step < cfg.steps:
                try:
                    batch = next(it)
                except data_mod.DataError as e:
                    raise self._data_error(e, start_step, last_ckpt) from None
                except (RuntimeError, StopIteration):
                    if self.signal is not None:  # a worker died of the stop signal too: the stop
                        break
                    raise
                t, noise, flip = self.draw(self.step)
                in_step = True  # an error from here to the increment leaves a half-done step
                self.train_step(batch, t, noise, flip, lr_at(cfg, self.step))
                self.step += 1
                in_step = False
                window_steps += 1
                bar.update(1)
                at_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if at_log:
                    stats = self.read_window()  # synchronises
                    dt = time.perf_counter() - t0 - paused
                    t0, paused = time.perf_counter(), 0.0
                    train_time += dt
                    ips = window_steps * cfg.batch_size / dt if dt > 0 else float("nan")
                    rec = {"step": self.step, "epoch": sampler.position(self.step - 1)[0],
                           "loss": stats["loss"], "lr": lr_at(cfg, self.step - 1),
                           "grad_norm": stats["grad_norm"], "images_per_s": ips,
                           "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
                           "skipped_steps": stats["skipped"], "nonfinite_streak": stats["streak"],
                           "window_steps": window_steps, "elapsed_s": time.perf_counter() - t_start}
                    def log(rec=rec):
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    self.on_rank0(log)  # rank 0 holds metrics.jsonl
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{ips:.0f}",
                                    skipped=stats["skipped"], refresh=False)
                    window_steps = 0
                    self.check_finite_streak(stats)
                if self.stop_requested(sync=at_log):
                    path = self.save()
                    bar.close()
                    raise Stopped(self.signal, self.step, path)
                pause = time.perf_counter()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.check_finite_streak()  # never checkpoint past a divergence
                    last_ckpt = (self.step, self.save())
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    try:
                        last_samples = (self.step, self.on_rank0(self.write_samples))
                    except _SamplingStopped:
                        raise self._stop_now(last_ckpt) from None
                if cfg.fid_every and self.step % cfg.fid_every == 0:
                    from fastddpm.evaluate import log_training_fid
                    try:
                        log_training_fid(self, bar, metrics)
                    except _SamplingStopped:
                        raise self._stop_now(last_ckpt) from None
                paused += time.perf_counter() - pause
        except Exception as e:
            if not in_step:  # between steps the state is consistent: keep the steps done
                self._save_after_error(e, start_step, last_ckpt)
            raise
        finally:
            bar.close()
            if metrics:
                metrics.close()
            del it
        if self.signal is not None and self.step < cfg.steps:
            path = self.save()
            raise Stopped(self.signal, self.step, path)
        if last_ckpt is None or last_ckpt[0] != self.step:
            last_ckpt = (self.step, self.save())
        if cfg.sample_n and (last_samples is None or last_samples[0] != self.step):
            try:
                last_samples = (self.step, self.on_rank0(self.write_samples))
            except _SamplingStopped:  # the checkpoint is written: stop now, not minutes later
                raise self._stop_now(last_ckpt) from None
        steps_done = self.step - start_step
        return {"step": self.step, "steps": steps_done, "seconds": time.perf_counter() - t_start,
                "train_seconds": train_time,
                "images_per_s": steps_done * cfg.batch_size / train_time if train_time > 0 else float("nan"),
                "loss": stats["loss"], "skipped": stats["skipped"], "checkpoint": last_ckpt[1],
                "samples": last_samples[1] if last_samples else None}


def _record_step(line):
    """The step of a metrics.jsonl line; None for a line that is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, TypeError, KeyError):
        return None


def _write_atomic(path, text):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- main ----------------------------------------------------------------------------

def _init_distributed():
    """(rank, world) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank, world


def _os_error_line(e):
    """An OSError as one line naming its file: 'FILE: No space left on device'."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def main(argv=None):
    """The CLI. Returns the exit status: 0 done, 1 a write failed while training (disk
    full: the message names the file), 2 bad input or data, 3 diverged, 128+signal when
    stopped (a checkpoint written)."""
    rank, world = _init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)

    def error(msg, code):
        print(f"fastddpm.train: error: {msg}", file=sys.stderr)
        return code

    handlers, trainer = {}, None
    try:
        try:
            cfg, resume, resume_path = config_from_args(argv)
            trainer = Trainer(cfg, resume=resume, rank=rank, world=world, log=say, resume_path=resume_path)
        except (CheckpointError, data_mod.DataError, ValueError) as e:
            return error(e, 2)
        if trainer.device.type == "cpu":
            keep_freed_memory()  # fewer page faults per step (fastddpm.allocator)

        def on_signal(signum, frame):
            if trainer.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: give up at once
            trainer.signal = signum

        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                handlers[s] = signal.signal(s, on_signal)
        if trainer.step >= cfg.steps:
            say(f"fastddpm.train: {resume_path} is at step {trainer.step} >= --steps {cfg.steps}; "
                "nothing to do (pass a larger --steps to train on)")
            return 0
        try:
            trainer.on_rank0(trainer.prepare_out)  # rank 0 claims the folder; the others learn its verdict
        except PeerFailed:
            return 2  # rank 0 says why
        except ValueError as e:
            return error(e, 2)
        except OSError as e:
            return error(_os_error_line(e), 2)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        changed = ""
        if resume is not None and resume["config"]["train"].get("variance") != cfg.variance:
            changed = (f"sampling variance {resume['config']['train'].get('variance')} -> {cfg.variance}; ")
        say(f"fastddpm.train: {cfg.preset} preset, {n_params:,} parameters, {len(trainer.dataset):,} "
            f"images ({trainer.dataset.source}) at {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}"
            f" on {world} x {trainer.device}, {trainer.precision}; "
            + (f"resuming {resume_path} at step {trainer.step}; {changed}" if resume is not None else "")
            + f"writing {cfg.out}")
        from fastddpm.ops import report_dispatch
        report_dispatch(trainer.model, say)  # now, and after the first step (its first-use checks)
        try:
            summary = trainer.train()
        except TrainingDiverged as e:
            print(f"fastddpm.train: {e}", file=sys.stderr)
            return 3
        except Stopped as e:
            name = signal.Signals(e.signum).name if e.signum else "signal"
            say(f"fastddpm.train: {name} at step {e.step}: checkpoint {e.path} written; continue "
                f"with: python -m fastddpm.train --resume {cfg.out}")
            return 128 + int(e.signum)
        except data_mod.DataError as e:
            return error(e, 2)
        except PeerFailed as e:  # rank 0 printed its error; this rank says why it stops
            return error(f"rank {rank}: stopping at step {trainer.step}: {e}", 1)
        except CheckpointError as e:  # e.g. "cannot write checkpoint FILE: No space left on device"
            return error(e, 1)
        except OSError as e:  # metrics.jsonl, a sample grid
            notes = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))  # the checkpoint saved, if any
            return error(_os_error_line(e) + f" (training stopped at step {trainer.step}){notes}", 1)
        say(f"done: step {summary['step']}/{cfg.steps}, {summary['steps']} steps in {summary['seconds']:.1f} s "
            f"({summary['images_per_s']:.1f} img/s training), loss {summary['loss']:.4f}, "
            f"{summary['skipped']} skipped; checkpoint {summary['checkpoint']}"
            + (f"; samples {summary['samples']}" if summary["samples"] else ""))
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
