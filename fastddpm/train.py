"""Train a DDPM: `python -m fastddpm.train --preset tiny` (CPU demo, minutes) or
`--preset cifar10` (the paper), single process or under torchrun.

    python -m fastddpm.train --preset tiny --out runs/tiny
    python -m fastddpm.train --preset cifar10 --data cifar-10-batches-py --out runs/cifar10
    python -m fastddpm.train --resume runs/cifar10                 # continue a run
    torchrun --nproc_per_node=8 -m fastddpm.train --preset cifar10 --data ... --out ...

The command line of fastddpm.training: the flags (a preset, overridden flag by
flag; --resume continues a run from its saved configuration) and the exit
codes: 0 done, 1 a write failed while training (the message names the file), 2
bad input or data, 3 diverged, 128 + the signal when stopped by SIGINT/SIGTERM
(to the trainer alone or to its whole process group: a checkpoint is written,
and --resume continues it bit-identically, see fastddpm.training.trainer).

A run folder (--out) belongs to one run (fastddpm.training.run_folder: its lock,
which folders a new or a resumed run may use, keep-N pruning, metrics.jsonl).
Under torchrun a failure in what rank 0 alone does (claiming the run folder,
writing a checkpoint, a sample grid or metrics.jsonl) stops every rank with one
line each (fastddpm.training.distributed.on_rank0), not a traceback from a
collective that rank 0 has left; the ranks agree on a stop signal at log steps.
"""
import argparse
import dataclasses
import os
import sys

from fastddpm import loader
from fastddpm.checkpoint import CheckpointError
from fastddpm.diffusion import SCHEDULES
from fastddpm.runtime import COMPILE_MODES, MEMORY_FORMATS
from fastddpm.training import cli
from fastddpm.training.config import (PRESETS, TrainConfig, check_resumable, fitting_restart, preset_config,
                                      validate)
from fastddpm.training.flags import (_finite, _fraction, _int, _ints, _nonneg_int, _os_error_line,  # noqa: F401
                                     _positive, _quantile, _restart, _seed)
from fastddpm.training.run_folder import check_out_folder
from fastddpm.training.trainer import Trainer


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
    ("--prediction", "prediction", str, "what the network learns to output: eps (the paper's noise, L_simple) | "
     "x0 (the clean image, loss weighted by the truncated SNR max(SNR, 1)) | v (a eps - s x0, Salimans & Ho "
     "2022, plain v MSE = (SNR + 1)-weighted x0 error); part of the run (refused on --resume) and recorded "
     "in the checkpoints' diffusion config"),
    ("--steps", "steps", _positive(int), "total optimizer steps of the run (on resume: the new total)"),
    ("--batch-size", "batch_size", _positive(int), "global batch size, split evenly over the ranks"),
    ("--lr", "lr", _positive(float), "Adam learning rate after warm-up"),
    ("--warmup", "warmup", _nonneg_int, "linear learning-rate warm-up steps (lr * min(step/warmup, 1))"),
    ("--lr-anneal", "lr_anneal", _fraction, "cosine-anneal the learning rate to 0 over this last fraction "
     "of --steps (0: the paper's constant rate; on --resume with a new --steps it follows the new total)"),
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
    ("--sample-sampler", "sample_sampler", str, "sampler of the sample grids: ddpm, ddim, dpmpp2m, dpmpp3m, "
     "unipc or ipndm, each on its default time grid (as fastddpm.sample)"),
    ("--sample-steps", "sample_steps", _nonneg_int, "network evaluations per grid sample (0: all T for ddpm, "
     "50 for the others)"),
    ("--sample-restart", "sample_restart", _restart, "ddpm grids: Restart sampling LO,HI,K (as fastddpm.sample "
     "--restart; other samplers ignore it) or none; recorded in the checkpoints, where fastddpm.sample "
     "takes it as its default; a preset's value is dropped where the run's grid has no room for it, e.g. T < 10"),
    ("--sample-threshold", "sample_threshold", _quantile, "the grids' dynamic thresholding quantile (as "
     "fastddpm.sample --threshold; 0: plain clipping); recorded as --sample-restart is"),
    ("--fid-every", "fid_every", _nonneg_int, "FID of --fid-n EMA samples against --fid-ref every N steps "
     "(0: never), into metrics.jsonl and the progress output (Inception weights as for fastddpm.evaluate: "
     "$FASTDDPM_INCEPTION or found by itself), sampling with --fid-sampler at --fid-steps. Cost: "
     "sampling fid_n images (fid_n x fid_steps network evaluations) + fid_n fp32 Inception passes + ~5-10 s for the FID; measured on the busy 2-core CPU "
     "(1 thread, 2026-12-01): ~2.4 ms per network evaluation per image on the tiny preset (0.24 s/image for its 100 ancestral steps), ~0.4 s/image Inception"),
    ("--fid-n", "fid_n", _positive(int), "samples per in-training FID (FID grows as n shrinks: compare equal n)"),
    ("--fid-sampler", "fid_sampler", str, "sampler of the in-training FID (as --sample-sampler)"),
    ("--fid-steps", "fid_steps", _positive(int), "network evaluations per in-training FID sample (at most T)"),
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
                   "the network, the beta schedule and T, the prediction, the data, the batch size and the seed are "
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
    p.add_argument("--tensorboard", dest="tensorboard", action=argparse.BooleanOptionalAction,
                   help="also write the metrics and sample grids as TensorBoard event files in "
                   "OUT/tensorboard/ (needs `pip install tensorboard`; default off). Every run draws "
                   "OUT/curves.png either way")
    return p


def config_from_args(argv=None):
    """(TrainConfig, resume checkpoint dict or None, resume path or None) from the command line."""
    given = vars(build_parser().parse_args(argv))
    resume = given.pop("resume", None)
    preset = given.pop("preset", None)
    if resume is None:
        cfg = dataclasses.replace(preset_config(preset or "cifar10"), **given)
        if "sample_restart" not in given:
            cfg.sample_restart = fitting_restart(cfg)   # the preset's, where the run's grid has room
        if cfg.out is None:
            cfg.out = os.path.join("runs", cfg.preset)
        if cfg.data:
            cfg.data = os.path.abspath(cfg.data)
        validate(cfg)
        check_out_folder(cfg.out)
        return cfg, None, None
    path = loader.resolve(resume)
    ckpt = loader.load(path)
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
    validate(cfg)
    check_out_folder(cfg.out, path, int(ckpt["step"]))
    return cfg, ckpt, path


# ---- main ----------------------------------------------------------------------------

def main(argv=None):
    """The CLI. Returns the exit status: 0 done, 1 a write failed while training (disk
    full: the message names the file), 2 bad input or data, 3 diverged, 128+signal when
    stopped (a checkpoint written)."""
    resume_seen = {}

    def build(rank, world, say):
        cfg, resume, resume_path = config_from_args(argv)
        resume_seen.update(ckpt=resume, path=resume_path)
        return Trainer(cfg, resume=resume, rank=rank, world=world, log=say, resume_path=resume_path)

    def idle(trainer):
        return (f"fastddpm.train: {resume_seen['path']} is at step {trainer.step} >= --steps {trainer.cfg.steps}; "
                "nothing to do (pass a larger --steps to train on)")

    def start(trainer, say):
        cfg, resume = trainer.cfg, resume_seen["ckpt"]
        n_params = sum(p.numel() for p in trainer.model.parameters())
        changed = ""
        if resume is not None and resume["config"]["train"].get("variance") != cfg.variance:
            changed = (f"sampling variance {resume['config']['train'].get('variance')} -> {cfg.variance}; ")
        say(f"fastddpm.train: {cfg.preset} preset, {n_params:,} parameters, {len(trainer.dataset):,} "
            f"images ({trainer.dataset.source}) at {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}"
            f" on {trainer.world} x {trainer.device}, {trainer.precision}; "
            + (f"resuming {resume_seen['path']} at step {trainer.step}; {changed}" if resume is not None else "")
            + f"writing {cfg.out}")
        from fastddpm.ops import report_dispatch
        report_dispatch(trainer.model, say)  # now, and after the first step (its first-use checks)

    def done(trainer, summary):
        return (f"done: step {summary['step']}/{trainer.cfg.steps}, {summary['steps']} steps in "
                f"{summary['seconds']:.1f} s ({summary['images_per_s']:.1f} img/s training), loss "
                f"{summary['loss']:.4f}, {summary['skipped']} skipped; checkpoint {summary['checkpoint']}"
                + (f"; samples {summary['samples']}" if summary["samples"] else ""))

    return cli.run("fastddpm.train", build, idle=idle, start=start, train=lambda t: t.train(), done=done)


if __name__ == "__main__":
    from fastddpm.files import tolerate_closed_stdout
    tolerate_closed_stdout()  # `... | head` must not cost the files being written
    sys.exit(main())
