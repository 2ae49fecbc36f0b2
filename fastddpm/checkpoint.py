"""Our checkpoint format: the one place it is written, and checked when read.

A checkpoint is a dict saved with torch.save:
    format, version, step, config {"model": UNetConfig dict, "diffusion":
    GaussianDiffusion.config, "train": TrainConfig dict, "runtime": the device,
    precision and world size it ran with}, model (state_dict), ema (state_dict
    or None), and, written by fastddpm.train, "train_state": {optimizer, scaler
    (GradScaler state, {} unless fp16), rng (one {python, numpy, torch, cuda}
    per rank), data {seed, epoch, position, steps_per_epoch, global_batch, size,
    image_shape, fingerprint, source}, counters {skipped, streak}, world_size,
    param_digest_per_rank (sha1 of each rank's weights)}.
It is read back with torch.load(weights_only=True): tensors and plain data
only (the RNG states are tensors and ints), so a crafted file cannot run code.
Writes are atomic (temp file in the same folder, fsync, rename, fsync the
folder), so a kill at any moment leaves the previous file intact; a failed
write (disk full) is a CheckpointError naming the file and the cause.

This module knows our format only (check_ours() checks a loaded file of it).
fastddpm.loader is the one loader (our files, run folders, bare state_dicts and
diffusers folders). Files are untrusted: check_sizes() checks every size the
config declares against fastddpm.limits and the weights' names and shapes
against the config (from a network built on the meta device, which allocates
nothing) before build_model() builds any network.
"""
import json
import os
import pickle
import re
import zipfile

import torch

from fastddpm import files, limits

FORMAT = "fastddpm-checkpoint"
# 2: Downsample pads TF 'SAME' (0, 1, 0, 1) as the paper's code; version 1
# networks padded symmetrically, so their weights belong to a different network.
VERSION = 2
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def _os_error(e):
    """The OSError behind e (torch.save reports a failed write as a RuntimeError
    whose context is the OSError), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def check_parent(path, what="checkpoint"):
    """A CheckpointError when a folder above `path` is a file (makedirs would only say "File exists")."""
    parent = files.file_in_the_way(path)
    if parent is not None:
        raise CheckpointError(f"cannot write {what} {path}: {parent} is a file, not a folder")


def atomic_save(obj, path) -> None:
    """torch.save(obj, path) so that `path` is always either the old or the new file
    (fastddpm.files.write_atomic). A failed write (disk full, read-only folder) is a
    CheckpointError naming the file and the cause; the old file is left as it was."""
    path = os.fspath(path)
    check_parent(path)
    try:
        files.write_atomic(path, lambda f: torch.save(obj, f))
    except BaseException as e:
        cause = _os_error(e)
        if cause is not None:
            raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}") from e
        raise


def list_checkpoints(folder):
    """[(step, path)] of the ckpt-*.pt files in `folder`, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in names if (m := _NAME.match(n))]
    return sorted(found)


def safe_torch_load(path, map_location="cpu"):
    """torch.load that never runs code: tensors and plain data only (weights_only),
    plus torch's version string (a str subclass the trainer records)."""
    from torch.torch_version import TorchVersion
    if not zipfile.is_zipfile(path):
        # torch.save's format before torch 1.6 allocates each storage at the size the
        # file declares before reading it: refused, so a crafted size cannot allocate
        raise CheckpointError(f"checkpoint {path} is unreadable: not a zip archive as torch.save writes "
                              "(truncated or corrupt, or saved by torch < 1.6: load and re-save it with "
                              "a current torch)")
    try:
        with torch.serialization.safe_globals([TorchVersion]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain data "
                                  f"({found.group(1)}): refused, since loading it could run code") from None
        raise CheckpointError(f"checkpoint {path} is unreadable (not a checkpoint, truncated or corrupt?): "
                              "its pickle stream is not plain data") from None
    except Exception as e:  # noqa: BLE001  torch's unpickler fails on corrupt bytes in many ways (IndexError, ...)
        if _foreign_zip(path):  # torch's own words: "[enforce fail at inline_container.cc:180] ..."
            raise CheckpointError(f"checkpoint {path} is unreadable: a zip archive, but not one torch.save "
                                  "wrote (no data.pkl; an .npz of images?)") from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {first}") from None


def _foreign_zip(path):
    """Whether `path` is a readable zip archive without torch.save's <name>/data.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            return not any(n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def is_state_dict(d):
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in d.items())


def is_ours(obj):
    """Whether a loaded file carries our format tag."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def check_ours(ckpt, path):
    """`ckpt` (a loaded file with our format tag) checked: its version and its weights'
    entries; errors name the file."""
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
    if "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no model weights (its key 'model' is missing)")
    for key in ("model", "ema"):  # ema may be None (not kept)
        if (key == "model" or ckpt.get(key) is not None) and not is_state_dict(ckpt[key]):
            raise CheckpointError(f"checkpoint {path}: its '{key}' entry is not a state_dict of "
                                  f"tensors (got {type(ckpt[key]).__name__})")
    return ckpt


def read_json(path):
    """A JSON object from a config file of at most limits.MAX_CONFIG_BYTES; errors name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limits.MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path} is not readable: {e.strerror or e}") from None
    if len(raw) > limits.MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is larger than {limits.MAX_CONFIG_BYTES >> 20} MiB, fastddpm's bound "
                              "for a JSON config")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def expected_shapes(model_cfg) -> dict:
    """{state_dict key: shape} of UNet(model_cfg), from a network built on the meta
    device: no memory is allocated for its parameters."""
    from fastddpm.unet import UNet
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNet(model_cfg).state_dict().items()}


def _model_config(ckpt, path):
    from fastddpm.unet import UNetConfig
    config = ckpt.get("config")
    try:
        return UNetConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad or missing model config: {e}") from None


def check_sizes(ckpt: dict, path="checkpoint"):
    """Refuse, before anything is built: a size in the config beyond fastddpm.limits
    (the network, the schedule, and a training config's own copies of them), and
    weights ("model", "ema") whose names or shapes do not fit the model config."""
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: bad or missing model config: no config section")
    try:
        limits.check_unet_config(f"{path}: model config", config.get("model"))
        limits.check_diffusion_config(f"{path}: diffusion config", config.get("diffusion"))
        train = config.get("train")
        if isinstance(train, dict):  # train --resume builds its network and schedule from this
            limits.check_unet_config(f"{path}: train config", train)
            limits.check_int(f"{path}: train config", "T", train.get("T"), limits.MAX_T, "schedule length")
    except limits.LimitError as e:
        raise CheckpointError(str(e)) from None
    model_cfg = _model_config(ckpt, path)
    shapes = None
    for which in ("model", "ema"):
        weights = ckpt.get(which)
        if not is_state_dict(weights):
            continue
        shapes = shapes or expected_shapes(model_cfg)
        fit = f"{path}: {which} weights do not fit the model config {model_cfg}"
        missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
        if missing or extra:
            more = lambda keys: f"{keys[:3]}{' ...' if len(keys) > 3 else ''}"  # noqa: E731
            raise CheckpointError(f"{fit}: " + "; ".join(
                ([f"missing {more(missing)}"] if missing else []) + ([f"unexpected {more(extra)}"] if extra else [])))
        for key, shape in shapes.items():
            w = weights[key]
            if tuple(w.shape) != shape:
                raise CheckpointError(f"{fit}: tensor {key} has shape {tuple(w.shape)}, the config needs {shape}")
            if not w.is_floating_point():
                raise CheckpointError(f"{fit}: tensor {key} is {w.dtype}, not floating point")


def build_model(ckpt: dict, use_ema=True, path="checkpoint"):
    """(UNet, GaussianDiffusion) from a loaded checkpoint; EMA weights when present
    and use_ema. Sizes beyond fastddpm.limits, weights that do not fit the config
    (checked before the network is built), and weights that hold NaN/inf or overflow
    the network's float32 are refused."""
    from fastddpm.diffusion import GaussianDiffusion
    from fastddpm.unet import UNet

    check_sizes(ckpt, path)
    model_cfg = _model_config(ckpt, path)
    diff_cfg = ckpt["config"].get("diffusion") or {"schedule": "linear", "T": 1000, "beta_start": 1e-4,
                                                   "beta_end": 0.02, "variance": "fixedlarge"}
    which = "ema" if use_ema and ckpt.get("ema") is not None else "model"
    weights = ckpt.get(which)
    if not is_state_dict(weights):
        raise CheckpointError(f"{path} has no model weights (its key '{which}' is missing or not a state_dict)")
    for name, w in weights.items():
        # a NaN or inf makes the sum non-finite (a cheap test); a finite sum can overflow, so confirm
        if w.is_floating_point() and not torch.isfinite(w.sum()) and not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise CheckpointError(f"{path}: {which} weight {name} holds {bad} NaN/inf value(s) of {w.numel()}; "
                                  "these weights cannot sample (a diverged run?)")
    try:
        diffusion = GaussianDiffusion.from_config(diff_cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad diffusion config {diff_cfg}: {e}") from e
    model = UNet(model_cfg)
    model.load_state_dict(weights)  # names and shapes were checked: only a dtype cast happens here
    for name, p in model.state_dict().items():
        # finite in the file's dtype (float64, say) but beyond the network's float32
        if not torch.isfinite(p.sum()) and not torch.isfinite(p).all():
            big = weights[name].abs().max().item()
            raise CheckpointError(f"{path}: {which} weight {name} overflows {p.dtype} (its largest magnitude is "
                                  f"{big:.3g}); these weights cannot sample")
    return model, diffusion
