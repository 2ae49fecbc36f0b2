"""The one loader: whatever a user names as a checkpoint, read as our dict.

resolve() says what a path names: a checkpoint file, the newest ckpt-*.pt of a
run folder, or a diffusers UNet2DModel / DDPMPipeline folder. load() reads it:
our .pt (fastddpm.checkpoint), a bare UNet state_dict with a config.json
({"model": ..., "diffusion": ...}) beside it, or a diffusers folder
(fastddpm.interop), always returning our checkpoint dict with every size checked
(checkpoint.check_sizes). load_for_sampling() builds the network from it. Nothing
read can run code (torch.load(weights_only=True), safetensors, bounded JSON).

It sits above checkpoint.py and interop.py, neither of which imports it.
"""
import os

from fastddpm import checkpoint as ckpt_io
from fastddpm import interop
from fastddpm.checkpoint import FORMAT, VERSION, CheckpointError


def resolve(path):
    """What `path` names: a checkpoint file, the newest ckpt-*.pt of a run folder,
    or a diffusers UNet / pipeline folder (returned as is; load() reads it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if interop.folder_kind(path) is not None:
            return path
        found = ckpt_io.list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint in folder {path}: no ckpt-*.pt (a run folder), "
                                  "model_index.json (a diffusers pipeline) or config.json with "
                                  "diffusion_pytorch_model.* (a diffusers UNet)")
        return found[-1][1]
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load(path, map_location="cpu") -> dict:
    """Read a checkpoint, deciding by what it finds: our .pt (or a run folder's
    newest), a bare state_dict with config.json beside it, a diffusers UNet
    folder or a diffusers pipeline folder. Always our dict format; errors name
    the file. Nothing read can run code."""
    path = resolve(path)
    if os.path.isdir(path):
        ckpt = interop.load_folder(path)
    else:
        ckpt = _load_file(path, map_location)
    ckpt_io.check_sizes(ckpt, path)
    return ckpt


def load_for_sampling(path, map_location="cpu", use_ema=True):
    """(UNet in eval mode, GaussianDiffusion, checkpoint dict) from anything load() reads."""
    path = resolve(path)
    ckpt = load(path, map_location)
    model, diffusion = ckpt_io.build_model(ckpt, use_ema=use_ema, path=path)
    return model.eval(), diffusion, ckpt


def _load_file(path, map_location):
    obj = ckpt_io.safe_torch_load(path, map_location)
    if ckpt_io.is_ours(obj):
        return ckpt_io.check_ours(obj, path)
    if ckpt_io.is_state_dict(obj):
        return _from_bare_state_dict(path, obj)
    raise CheckpointError(f"{path} is not a fastddpm checkpoint (no '{FORMAT}' format tag, "
                          "and not a state_dict with a config.json beside it)")


def _from_bare_state_dict(path, state_dict):
    """A plain UNet state_dict with config.json ({"model": ..., "diffusion": ...}) beside it."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} is a bare state_dict; its config.json is missing "
                              f"(expected at {cfg_path})")
    config = ckpt_io.read_json(cfg_path)
    if "model" not in config:
        raise CheckpointError(f"{cfg_path} has no 'model' section")
    return {"format": FORMAT, "version": VERSION, "step": None, "config": config,
            "model": state_dict, "ema": None}
