"""The one place checkpoints are written and read.

A checkpoint is a dict saved with torch.save:
    format, version, step, config {"model": UNetConfig dict, "diffusion":
    GaussianDiffusion.config, "train": TrainConfig dict, "runtime": the device,
    precision and world size it ran with}, model (state_dict), ema (state_dict
    or None), and, written by fastddpm.train, "train_state": {optimizer, scaler
    (GradScaler state, {} unless fp16), rng (one {python, numpy, torch, cuda}
    per rank), data {seed, epoch, position, steps_per_epoch, global_batch, size,
    image_shape, fingerprint, source}, counters {skipped, streak}, world_size,
    param_digest_per_rank (sha1 of each rank's weights)}.
Writes are atomic (temp file in the same folder, fsync, rename, fsync the
folder), so a kill at any moment leaves the previous file intact.
"""
import json
import os
import pickle
import re
import tempfile
import zipfile

import torch

FORMAT = "fastddpm-checkpoint"
# 2: Downsample pads TF 'SAME' (0, 1, 0, 1) as the paper's code; version 1
# networks padded symmetrically, so their weights belong to a different network.
VERSION = 2
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def atomic_save(obj, path) -> None:
    """torch.save(obj, path) so that `path` is always either the old or the new file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def list_checkpoints(folder):
    """[(step, path)] of the ckpt-*.pt files in `folder`, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in names if (m := _NAME.match(n))]
    return sorted(found)


def resolve(path):
    """A checkpoint file, or the newest ckpt-*.pt in a run folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint (ckpt-*.pt) in folder {path}")
        return found[-1][1]
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint (file or run folder), with errors that name the file."""
    path = resolve(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {e}") from e
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        if ckpt.get("version") == 1:
            raise CheckpointError(
                f"checkpoint {path} has format version 1: "
                "its network padded the stride-2 downsampling convs symmetrically, not with the "
                "paper's TF 'SAME' padding (0, 1, 0, 1) this fastddpm uses, so its weights belong to "
                "a different network and would give wrong outputs here; retrain it, or sample it "
                "with the fastddpm version that wrote it")
        if ckpt.get("version") != VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')}, "
                                  f"this fastddpm reads version {VERSION}")
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _from_bare_state_dict(path, ckpt)
    raise CheckpointError(f"{path} is not a fastddpm checkpoint (no '{FORMAT}' format tag, "
                          "and not a state_dict with a config.json beside it)")


def _from_bare_state_dict(path, state_dict):
    """A plain UNet state_dict with config.json ({"model": ..., "diffusion": ...}) beside it."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} is a bare state_dict; its config.json is missing "
                              f"(expected at {cfg_path})")
    with open(cfg_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if "model" not in config:
        raise CheckpointError(f"{cfg_path} has no 'model' section")
    return {"format": FORMAT, "version": VERSION, "step": None, "config": config,
            "model": state_dict, "ema": None}


def build_model(ckpt: dict, use_ema=True, path="checkpoint"):
    """(UNet, GaussianDiffusion) from a loaded checkpoint; EMA weights when present
    and use_ema. A state_dict that does not fit the config is refused."""
    from fastddpm.diffusion import GaussianDiffusion
    from fastddpm.unet import UNet, UNetConfig

    config = ckpt.get("config") or {}
    try:
        model_cfg = UNetConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad or missing model config: {e}") from e
    diff_cfg = config.get("diffusion") or {"schedule": "linear", "T": 1000, "beta_start": 1e-4,
                                           "beta_end": 0.02, "variance": "fixedlarge"}
    model = UNet(model_cfg)
    weights = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model config {model_cfg}: {e}") from e
    return model, GaussianDiffusion.from_config(diff_cfg)


def load_for_sampling(path, map_location="cpu", use_ema=True):
    """(UNet in eval mode, GaussianDiffusion, checkpoint dict) from a file or run folder."""
    path = resolve(path)
    ckpt = load(path, map_location)
    model, diffusion = build_model(ckpt, use_ema=use_ema, path=path)
    return model.eval(), diffusion, ckpt
