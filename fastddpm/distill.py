"""Progressive distillation: `python -m fastddpm.distill --teacher CKPT --out DIR
--final-steps 4 --round-iters N` (Salimans & Ho, ICLR 2022), single process or
under torchrun.

    python -m fastddpm.distill --teacher runs/tiny --out runs/tiny-d4 --round-iters 1000
    python -m fastddpm.distill --resume runs/tiny-d4               # continue a run
    python -m fastddpm.sample --checkpoint runs/tiny-d4 --n 64 --out s/   # 4 network evaluations

The student starts as the teacher's copy; each round trains it to match two
DDIM steps of the teacher with one of its own (Algorithm 2: the x target, the
truncated-SNR weight max(SNR, 1)), then it becomes the teacher and the step
count halves, from --start-steps (a power of two <= T, the teacher's DDIM grid)
down to --final-steps. The grids are integer timesteps, time-uniform from T - 1,
and each is every other point of the one before (fastddpm.training.distill).
The student predicts v (default) or x0, never eps; an eps teacher (the paper's,
a diffusers folder) is first converted by a round on its own DDIM map
(--convert-iters); see fastddpm.training.distill for why. That round costs
quality (measured, README: FID 192.8 -> 243.2 on a 16-step grid after 1,500
updates): a model trained for distillation should be trained with --prediction v.

DIR gets student-NNNN.pt per round (EMA weights; NNNN = its steps; its config
records its grid, which fastddpm.sample uses by default), the trainer's
resumable ckpt-*.pt (with the round's teacher), config.json and metrics.jsonl.
Exit codes as fastddpm.train: 0 done, 1 a write failed, 2 bad input, 3 diverged,
128 + the signal when stopped by SIGINT/SIGTERM (a checkpoint is written;
--resume continues it bit-identically on the CPU).
"""
import argparse
import dataclasses
import os
import sys

from fastddpm import loader
from fastddpm import limits
from fastddpm.checkpoint import CheckpointError
from fastddpm.diffusion import SCHEDULES, GaussianDiffusion
from fastddpm.training import cli
from fastddpm.training.config import TrainConfig, validate
from fastddpm.training.distill import DistillConfig, DistillTrainer, validate_distill
from fastddpm.training.flags import _finite, _int, _nonneg_int, _positive, _seed
from fastddpm.training.run_folder import check_out_folder

# flags a resumed run may change (they do not change what it computes on the CPU, or only its speed)
RESUME_FREE = ("out", "device", "precision", "progress", "threads", "workers", "ckpt_every", "keep", "log_every")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastddpm.distill", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--teacher", metavar="CKPT", help="the teacher: any checkpoint fastddpm reads (a file, a "
                   "run folder's newest, a diffusers folder); its EMA weights")
    p.add_argument("--resume", metavar="DIR", help="continue the distillation in DIR (its newest ckpt-*.pt) "
                   "with its saved settings; only " + ", ".join("--" + f.replace("_", "-") for f in RESUME_FREE)
                   + " may change")
    p.add_argument("--out", help="run folder (default runs/distill)")
    p.add_argument("--final-steps", dest="final_steps", type=_positive(int),
                   help="the last student's steps: --start-steps halved a whole number of times (default 4)")
    p.add_argument("--start-steps", dest="start_steps", type=_positive(int),
                   help="the teacher's DDIM grid: a power of two <= T (default the largest: 64 for the tiny "
                   "preset's T = 100, 512 for T = 1000)")
    p.add_argument("--round-iters", dest="round_iters", type=_int,
                   help="optimizer steps per halving, >= 1 (default 1000)")
    p.add_argument("--convert-iters", dest="convert_iters", type=_int,
                   help="optimizer steps of the conversion round that first turns a teacher of another "
                   "parameterisation (eps) into a --prediction student on the start grid (default "
                   "--round-iters when they differ, else 0; 0: none)")
    p.add_argument("--prediction", help="the student's output: v (default) or x0 (eps is refused: it cannot "
                   "take few steps, see fastddpm.training.distill)")
    p.add_argument("--data", help="training images (as fastddpm.train --data); default the teacher's training "
                   "data (needed for a teacher without a training config, e.g. a diffusers folder)")
    p.add_argument("--batch-size", dest="batch_size", type=_positive(int),
                   help="global batch size (default the teacher's training batch size, else 128)")
    p.add_argument("--lr", type=_positive(float), help="Adam learning rate at the start of each round, "
                   "decaying linearly to 0 over the round (default 1e-4)")
    p.add_argument("--ema-decay", dest="ema_decay", type=_finite,
                   help="EMA decay of the student weights (default 1 - 10 / --round-iters, at least 0)")
    p.add_argument("--grad-clip", dest="grad_clip", type=_positive(float), help="gradient norm clip (default 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 (default bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--seed", type=_seed, help="seed of the data order, noise and dropout (default 0)")
    p.add_argument("--ckpt-every", dest="ckpt_every", type=_nonneg_int,
                   help="resumable checkpoint every N steps (default 500; 0: only at the end and on a signal)")
    p.add_argument("--keep", type=_positive(int), help="keep the last K resumable checkpoints (default 2; the "
                   "student-NNNN.pt files are all kept)")
    p.add_argument("--log-every", dest="log_every", type=_positive(int), help="log every N steps (default 25)")
    p.add_argument("--workers", type=_nonneg_int, help="DataLoader worker processes (default 1)")
    p.add_argument("--threads", type=_nonneg_int, help="CPU threads for torch ops (0: torch's default; "
                   "default as the tiny preset: one per core but one)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default on)")
    return p


def _teacher_train_config(ckpt):
    config = ckpt.get("config") or {}
    train = config.get("train")
    if not isinstance(train, dict):  # a student of an earlier distillation: that run's config
        train = (config.get("distill") or {}).get("train")
    try:
        return TrainConfig.from_dict(train) if isinstance(train, dict) else None
    except (TypeError, ValueError):
        return None


def new_run(given):
    """(TrainConfig, DistillConfig, student diffusion, teacher diffusion, teacher UNet) of a new run."""
    path = loader.resolve(given["teacher"])
    teacher, t_diff, ckpt = loader.load_for_sampling(path)
    t_cfg = t_diff.config
    if t_cfg.get("schedule") not in SCHEDULES:
        raise CheckpointError(f"teacher {path}: its beta schedule ({t_cfg.get('schedule')}) is not one a "
                              f"distillation run can record ({', '.join(SCHEDULES)})")
    prediction = given.get("prediction", "v")
    t_pred = getattr(t_diff, "prediction", "eps")
    s_diff = GaussianDiffusion.from_config({**t_cfg, "prediction": prediction})
    T = t_diff.num_timesteps
    saved = _teacher_train_config(ckpt)
    net = teacher.config
    base = saved or TrainConfig()
    cfg = dataclasses.replace(
        base, preset=base.preset, out=given.get("out", os.path.join("runs", "distill")),
        image_size=net.image_size, ch=net.ch, ch_mult=net.ch_mult, num_res_blocks=net.num_res_blocks,
        attn_resolutions=net.attn_resolutions, dropout=net.dropout, num_groups=net.num_groups,
        schedule=t_cfg["schedule"], T=T, beta_start=t_cfg.get("beta_start", base.beta_start),
        beta_end=t_cfg.get("beta_end", base.beta_end), variance=t_diff.variance,
        lr=1e-4, warmup=0, grad_clip=1.0, ckpt_every=500, keep=2, sample_every=0, sample_n=0, fid_every=0,
        log_every=25, workers=1, threads=base.threads,
        seed=0, compile="none", tensorboard=False, prediction=prediction)
    if saved is None and "data" not in given:
        raise ValueError(f"teacher {path} has no training config (a diffusers folder?): give --data, the "
                         "images it was trained on")
    if saved is None:
        cfg.batch_size = 128
    for k in ("data", "batch_size", "lr", "grad_clip", "device", "precision", "seed", "ckpt_every", "keep",
              "log_every", "workers", "threads", "progress"):
        if k in given:
            setattr(cfg, k, given[k])
    if "data" in given and cfg.data:
        cfg.data = os.path.abspath(cfg.data)
    if cfg.model_config(net.in_channels) != net:
        raise CheckpointError(f"teacher {path}: its network {net} is not one a training run builds "
                              "(eps or num_heads differ from fastddpm.train's)")
    start = given.get("start_steps", 1 << (T.bit_length() - 1))
    dcfg = DistillConfig(teacher=os.path.abspath(path), teacher_prediction=t_pred,
                         teacher_clip=bool(((ckpt.get("config") or {}).get("sampling") or {}).get("clip", True)),
                         prediction=prediction, start_steps=start, final_steps=given.get("final_steps", 4),
                         round_iters=given.get("round_iters", 1000))
    dcfg.convert_iters = given.get("convert_iters", dcfg.round_iters if t_pred != prediction else 0)
    validate_distill(dcfg, T)
    cfg.steps = dcfg.total_iters()
    cfg.ema_decay = given.get("ema_decay", max(0.0, 1.0 - 10.0 / dcfg.round_iters))
    validate(cfg)
    check_out_folder(cfg.out)
    return cfg, dcfg, s_diff, t_diff, teacher


def resumed_run(given):
    """(TrainConfig, DistillConfig, student diffusion, teacher diffusion, checkpoint, path) to resume."""
    resume = given["resume"]
    path = loader.resolve(resume)
    if os.path.isdir(path):  # a diffusers folder
        raise CheckpointError(f"--resume {resume}: not a distillation run (a diffusers folder)")
    ckpt = loader.load(path)
    config = ckpt.get("config") or {}
    d = config.get("distill")
    if not isinstance(d, dict) or "distill" not in (ckpt.get("train_state") or {}):
        raise CheckpointError(f"--resume {resume}: {path} is not a distillation checkpoint (no distillation "
                              "state; a training run resumes with python -m fastddpm.train --resume)")
    try:  # an untrusted file: every size bounded before anything is built from it
        limits.check_unet_config(f"{path}: distill train config", d.get("train"))
        limits.check_int(f"{path}: distill train config", "T", d["train"].get("T"), limits.MAX_T, "schedule length")
        limits.check_diffusion_config(f"{path}: distill teacher diffusion config", d.get("teacher_diffusion"))
        saved = TrainConfig.from_dict(d["train"])
        dcfg = DistillConfig.from_dict({k: v for k, v in d.items() if k not in ("train", "teacher_diffusion")})
        s_diff = GaussianDiffusion.from_config(config["diffusion"])
        t_diff = GaussianDiffusion.from_config(d["teacher_diffusion"])
        validate_distill(dcfg, s_diff.num_timesteps)
    except (limits.LimitError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad distillation config: {e}") from None
    cfg = dataclasses.replace(saved)
    changed = []
    for k, v in given.items():
        if k in ("resume",):
            continue
        if k in RESUME_FREE:
            setattr(cfg, k, v)
        elif k in ("teacher", "final_steps", "start_steps", "round_iters", "convert_iters", "prediction"):
            if getattr(dcfg, k) != (os.path.abspath(v) if k == "teacher" else v):
                changed.append("--" + k.replace("_", "-"))
        elif getattr(saved, k, v) != (os.path.abspath(v) if k == "data" else v):
            changed.append("--" + k.replace("_", "-"))
    if changed:
        raise ValueError(f"--resume {resume}: {', '.join(changed)} would change the run; only "
                         + ", ".join("--" + f.replace("_", "-") for f in RESUME_FREE) + " may change")
    if "out" not in given:
        cfg.out = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(path))
    validate(cfg)
    check_out_folder(cfg.out, path, int(ckpt["step"]))
    return cfg, dcfg, s_diff, t_diff, ckpt, path


def main(argv=None):
    """The CLI; returns the exit status (module docstring)."""
    run = {}

    def build(rank, world, say):
        given = vars(build_parser().parse_args(argv))
        if ("teacher" in given) == ("resume" in given):
            raise ValueError("give --teacher CKPT (a new run) or --resume DIR, not both or neither")
        if "resume" in given:
            cfg, dcfg, s_diff, t_diff, resume, path = resumed_run(given)
            run.update(path=path, resumed=True)
            return DistillTrainer(cfg, dcfg, s_diff, t_diff, resume=resume, rank=rank, world=world, log=say,
                                  resume_path=path)
        cfg, dcfg, s_diff, t_diff, teacher = new_run(given)
        run.update(path=None, resumed=False)
        return DistillTrainer(cfg, dcfg, s_diff, t_diff, teacher=teacher, rank=rank, world=world, log=say)

    def idle(trainer):
        return f"fastddpm.distill: {run['path']} is at step {trainer.step}, the run's end: nothing to do"

    def start(trainer, say):
        cfg, dcfg = trainer.cfg, trainer.dcfg
        plan = " -> ".join(f"{n}" + (" (conversion)" if k == "convert" else "") for k, n, _, _ in dcfg.rounds())
        say(f"fastddpm.distill: {dcfg.teacher_prediction} teacher at {dcfg.start_steps} DDIM steps -> "
            f"{dcfg.prediction} student: {plan} steps, {cfg.steps} iterations of batch {cfg.batch_size} on "
            f"{trainer.world} x {trainer.device}, {trainer.precision}; "
            + (f"resuming {run['path']} at step {trainer.step}; " if run["resumed"] else "") + f"writing {cfg.out}")

    def train(trainer):
        summary = trainer.train()
        trainer.on_rank0(trainer.write_student)
        return summary

    def done(trainer, summary):
        return (f"done: {summary['steps']} steps in {summary['seconds']:.1f} s ({summary['images_per_s']:.1f} "
                f"img/s), loss {summary['loss']:.4f}; students "
                + ", ".join(f"student-{n:04d}.pt" for _, n, _, _ in trainer.dcfg.rounds()) + f" in {trainer.cfg.out}")

    return cli.run("fastddpm.distill", build, idle=idle, start=start, train=train, done=done)


if __name__ == "__main__":
    from fastddpm.files import tolerate_closed_stdout
    tolerate_closed_stdout()  # `... | head` must not cost the files being written
    sys.exit(main())
