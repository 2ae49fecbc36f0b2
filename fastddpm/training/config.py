"""The configuration of a training run: TrainConfig (every setting; the
defaults are the paper's CIFAR-10 run), the presets, the checks that refuse a
setting before anything runs (validate) and the fields a resumed run may not
change (RUN_IDENTITY, check_resumable)."""
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from fastddpm import metrics
from fastddpm.checkpoint import CheckpointError
from fastddpm.diffusion import PREDICTIONS, SCHEDULES, GaussianDiffusion
from fastddpm.runtime import COMPILE_MODES, MEMORY_FORMATS, PRECISIONS, cpu_has_native_bf16, parse_device
from fastddpm.sampling import MAX_SEED, make_plan
from fastddpm.training import tensorboard
from fastddpm.unet import UNetConfig

SEED_MAX = MAX_SEED  # the samplers' range: sample grids and in-training FID use the run's seed
_NET = UNetConfig()


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
    prediction: str = "eps"  # what the network outputs: eps (the paper's) | x0 | v (GaussianDiffusion)
    # optimisation
    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    lr_anneal: float = 0.0  # cosine-anneal lr to 0 over this last fraction of `steps` (0: the paper's constant lr)
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
    sample_sampler: str = "ddpm"   # the grids' sampler (fastddpm.sampling.tables.SAMPLERS), its default grid
    sample_steps: int = 0          # network evaluations per grid sample; 0: all T (ddpm) / 50 (the others)
    # Restart sampling (lo, hi, K) and the dynamic-thresholding quantile of the grids
    # (fastddpm.sampling.tables); fastddpm.sample takes a run's as its defaults.
    sample_restart: Optional[tuple] = None
    sample_threshold: float = 0.0
    fid_every: int = 0
    fid_n: int = 5000
    # The in-training FID's sampler and network evaluations (at most T): by default
    # DPM-Solver++(2M) at 20, 50x fewer than ancestral sampling at T = 1000; its FID
    # is a trend to watch, not the 1000-step number a paper reports.
    fid_sampler: str = "dpmpp2m"
    fid_steps: int = 20
    fid_ref: Optional[str] = None
    log_every: int = 100
    workers: int = 4
    threads: int = 0
    progress: bool = True
    tensorboard: bool = False  # also write RUN/tensorboard/ event files

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        d["sample_restart"] = list(self.sample_restart) if self.sample_restart is not None else None
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
        if d.get("sample_restart") is not None:
            d["sample_restart"] = tuple(d["sample_restart"])
        return cls(**d)

    def model_config(self, in_channels=3):
        return UNetConfig(image_size=self.image_size, in_channels=in_channels, ch=self.ch,
                          ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                          attn_resolutions=self.attn_resolutions, dropout=self.dropout,
                          num_groups=self.num_groups)

    def diffusion_config(self):
        return {"schedule": self.schedule, "T": self.T, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "variance": self.variance, "prediction": self.prediction}


def usable_cpus():
    """CPUs this process may run on (its affinity mask, e.g. a container's), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_TINY_BF16 = cpu_has_native_bf16()

PRESETS = {
    # Ho et al. 2020, CIFAR-10: the TrainConfig defaults.
    "cifar10": {},
    # 2 CPU cores, embedded 16x16 shapes, samples with visible structure in about 4
    # minutes. Compute threads: one per core but one (the data worker's), at most 8: an
    # OpenMP thread per core of a 2-core machine ran up to 10x slower whenever anything
    # else was busy, while a second thread on an idle one gained only ~17%. Measured on
    # 2026-12-07 (FID of 256 default samples against 256 data images, as in the README):
    # the cosine schedule and fixedsmall sampling variance beat linear 2e-4..0.04 and
    # fixedlarge; bf16 autocast, where the CPU computes bf16 natively, makes the step
    # 1.35x faster, spent as more steps in the same time; lr 4e-3 cosine-annealed to 0
    # over the second half beat a constant 2e-3 (FID 140 vs 165). T=100: as good as 500
    # at equal steps (FID 139.9 vs 140.3) with 5x cheaper sampling (the final grid, and
    # fastddpm.sample's default of all T steps), the time saved spent on steps; EMA 0.99
    # beat 0.995 by 3 with each of three training seeds (which alone move the FID by ~20).
    # Sampled (the grids, and fastddpm.sample's default for its checkpoints) with Restart
    # 0,9,16 and dynamic thresholding 0.995: FID 116.8 -> 77.2 (seed 0), 137.3 -> 101.3
    # (seed 1), 119.9 -> 94.2 (seed 2) for 2.4x the network evaluations (README).
    "tiny": dict(image_size=16, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, num_groups=8, schedule="cosine", T=100, variance="fixedsmall",
                 steps=2500 if _TINY_BF16 else 1850,
                 batch_size=32, lr=4e-3, warmup=100, lr_anneal=0.5, ema_decay=0.99,
                 precision="bf16" if _TINY_BF16 else None,
                 ckpt_every=500, sample_every=0, sample_n=36, sample_batch=36, sample_restart=(0, 9, 16),
                 sample_threshold=0.995, log_every=25, workers=1,
                 threads=max(1, min(8, usable_cpus() - 1))),
}

# Changing these on resume would make a different run: refused.
RUN_IDENTITY = ("image_size", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                "num_groups", "schedule", "T", "beta_start", "beta_end", "prediction", "batch_size", "seed")


def preset_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return TrainConfig(preset=name, **PRESETS[name])


def check_resumable(saved: TrainConfig, cfg: TrainConfig, path):
    """Refuse to resume the checkpoint at `path` (written with `saved`) as `cfg` where
    they differ in RUN_IDENTITY: that would be another run."""
    diff = [f"{k}: checkpoint {getattr(saved, k)!r}, now {getattr(cfg, k)!r}"
            for k in RUN_IDENTITY if getattr(saved, k) != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"cannot resume from {path}: it was written by a different "
                              "configuration (" + "; ".join(diff) + "). Start a new run in another "
                              "--out folder, or drop the flags that change it.")


def grid_steps(cfg: TrainConfig):
    """Network evaluations per sample of the grids: --sample-steps, else all T for
    ddpm (the paper's sampler) and min(50, T) for the few-step samplers."""
    if cfg.sample_steps:
        return cfg.sample_steps
    return cfg.T if cfg.sample_sampler == "ddpm" else min(50, cfg.T)


def grid_restart(cfg: TrainConfig):
    """The grids' Restart (lo, hi, K): --sample-restart where the grids' sampler is
    ddpm (the only one it applies to), else None."""
    return cfg.sample_restart if cfg.sample_sampler == "ddpm" else None


def fitting_restart(cfg: TrainConfig):
    """cfg.sample_restart, or None where it does not fit the run's ddpm grid (the tiny
    preset's 0,9,16 needs T >= 10): for a preset's value, which must not refuse a run
    that changed T or the grid. An invalid rest of cfg is validate()'s to report."""
    if cfg.sample_restart is None or cfg.sample_sampler != "ddpm":
        return cfg.sample_restart
    try:
        make_plan(GaussianDiffusion.from_config(cfg.diffusion_config()), "ddpm", grid_steps(cfg),
                  restart=cfg.sample_restart)
    except ValueError:
        return None
    return cfg.sample_restart


def fid_steps(cfg: TrainConfig):
    """Network evaluations per sample of the in-training FID (--fid-steps, at most T)."""
    return min(cfg.fid_steps, cfg.T)


def check_training_fid(cfg):
    """Fail before training starts when --fid-every is set without usable --fid-ref / weights."""
    from fastddpm.inception_weights import resolve_weights

    if not cfg.fid_ref:
        raise metrics.EvaluateError("--fid-every needs --fid-ref ref.npz (make it with: python -m "
                                    "fastddpm.evaluate stats DATA --out ref.npz)")
    if cfg.fid_n < 2:
        raise metrics.EvaluateError(f"--fid-n must be >= 2, got {cfg.fid_n}")
    metrics.check_compatible(metrics.load_stats(cfg.fid_ref))
    resolve_weights(None)


def validate(cfg: TrainConfig):
    """Refuse settings that cannot run (a ValueError naming the flag); returns cfg."""
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
    if cfg.prediction not in PREDICTIONS:
        raise ValueError(f"--prediction must be one of {PREDICTIONS}, got {cfg.prediction!r}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0.0 <= cfg.lr_anneal <= 1.0:
        raise ValueError(f"--lr-anneal must be in [0, 1], got {cfg.lr_anneal}")
    if not 0 < cfg.beta_start <= cfg.beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {cfg.beta_start}, {cfg.beta_end}")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ValueError(f"--seed must be in [0, 2**63 - 1], got {cfg.seed}")
    if cfg.device is not None:
        parse_device(cfg.device)
    cfg.model_config()  # UNetConfig validates the network fields
    diffusion = GaussianDiffusion.from_config(cfg.diffusion_config())
    for flag, sampler, steps in (("--sample-sampler/--sample-steps", cfg.sample_sampler, grid_steps(cfg)),
                                 ("--fid-sampler/--fid-steps", cfg.fid_sampler, fid_steps(cfg))):
        try:
            make_plan(diffusion, sampler, steps)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    try:
        make_plan(diffusion, cfg.sample_sampler, grid_steps(cfg), restart=grid_restart(cfg),
                  threshold=cfg.sample_threshold)
    except ValueError as e:
        raise ValueError(f"--sample-restart/--sample-threshold: {e} (--sample-restart none "
                         "--sample-threshold 0: off)") from None
    if cfg.tensorboard and tensorboard.available():
        raise ValueError(tensorboard.available())
    if cfg.fid_every:
        check_training_fid(cfg)  # ref stats and Inception weights usable: fail now, not hours in
    return cfg
