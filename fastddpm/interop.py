"""diffusers folders in and out: UNet2DModel (config.json + weights) and
DDPMPipeline (model_index.json, unet/, scheduler/) of the DDPM family.

In: `load_folder(DIR)` gives a checkpoint dict in our format (fastddpm.loader
calls it when it finds such a folder). The config maps to UNetConfig, the
weights to our state_dict (to_q / to_k / to_v stacked into one qkv 1x1 conv,
heads in the same consecutive-channel order), the scheduler to the diffusion
config. What fastddpm's network or sampler cannot express is refused with the
field and its value; config keys this diffusers version would ignore are ignored
with a warning. Weights are read with safetensors, or a .bin with
torch.load(weights_only=True): nothing read runs code.

Out: `export_pipeline(ckpt, DIR)` writes a folder that diffusers'
DDPMPipeline.from_pretrained loads.

Known difference (both directions): diffusers computes the sinusoidal timestep
frequencies as exp(-log(10000) * i / (half - 1)) in float32, the paper's code
(and fastddpm) as exp(i * -(log(10000) / (half - 1))): the float32 embeddings
differ in the last bit, which is the only difference between the two networks.
"""
import json
import os
import warnings

import torch

from fastddpm import files, limits
from fastddpm.checkpoint import (FORMAT, VERSION, CheckpointError, check_parent, expected_shapes,
                                 read_json, safe_torch_load)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_VERSION = "0.42.1"  # the version the mapping was checked against

# UNet2DModel's defaults (diffusers 0.42.1): a key missing from config.json means this.
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
# The value the paper's network needs, for each field that is not mapped.
UNET_REQUIRED = {
    "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1,
    "flip_sin_to_cos": False, "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1,
    "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None,
}
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
    "steps_offset": 0, "rescale_betas_zero_snr": False,
}
SCHEDULER_REQUIRED = {"thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False}
# ours <-> diffusers names
SCHEDULES = {"linear": "linear", "quad": "scaled_linear", "cosine": "squaredcos_cap_v2"}
VARIANCES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def folder_kind(path):
    """"pipeline", "unet" or None for a folder."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "pipeline"
    if os.path.isfile(os.path.join(path, "config.json")) and any(
            os.path.exists(os.path.join(path, w)) for w in WEIGHT_FILES):
        return "unet"
    return None


def _with_defaults(cfg, defaults, where, what):
    unknown = sorted(k for k in cfg if k not in defaults and not k.startswith("_"))
    if unknown:
        warnings.warn(f"{where}: ignoring {what} fields {unknown} (diffusers {DIFFUSERS_VERSION} ignores "
                      "them too)", stacklevel=3)
    return {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}


def _refuse(where, field, value, why):
    raise CheckpointError(f"{where}: {field}={value!r} is not supported ({why})")


# ---- config ---------------------------------------------------------------------

def _read_config(raw, class_name, defaults, required, where, who):
    """`raw` (a diffusers config of `class_name`) with its defaults filled in; a
    CheckpointError names any field that differs from `required` (`who` needs it)."""
    if raw.get("_class_name", class_name) != class_name:
        _refuse(where, "_class_name", raw["_class_name"], f"fastddpm reads {class_name}")
    cfg = _with_defaults(raw, defaults, where, f"{class_name} config")
    for field, need in required.items():
        if cfg[field] != need:
            _refuse(where, field, cfg[field], f"{who} needs {need!r}")
    return cfg


def unet_config_from_diffusers(raw: dict, where="config.json"):
    """UNetConfig for a diffusers UNet2DModel config, or CheckpointError naming the field."""
    from fastddpm.unet import UNetConfig
    cfg = _read_config(raw, "UNet2DModel", UNET_DEFAULTS, UNET_REQUIRED, where, "the paper's network")
    if cfg["act_fn"] not in ("silu", "swish"):
        _refuse(where, "act_fn", cfg["act_fn"], "the paper's network uses silu")
    for field in ("block_out_channels", "down_block_types", "up_block_types"):
        if not isinstance(cfg[field], (list, tuple)):
            _refuse(where, field, cfg[field], "a list")
    boc, down, up = list(cfg["block_out_channels"]), list(cfg["down_block_types"]), list(cfg["up_block_types"])
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]  # square
    try:  # before anything loops over the levels or builds a network
        limits.check_int(where, "sample_size", size, limits.MAX_IMAGE_SIZE)
        limits.check_int(where, "len(block_out_channels)", len(boc), limits.MAX_LEVELS, "resolution levels")
        limits.check_int(where, "max(block_out_channels)", max((c for c in boc if isinstance(c, int)), default=0),
                         limits.MAX_CHANNELS, "channels at one level")
        limits.check_int(where, "layers_per_block", cfg["layers_per_block"], limits.MAX_RES_BLOCKS)
    except limits.LimitError as e:
        raise CheckpointError(str(e)) from None
    if not boc or not all(isinstance(c, int) and c > 0 for c in boc):
        _refuse(where, "block_out_channels", boc, "expected positive ints")
    ch = boc[0]
    if any(c % ch for c in boc):
        _refuse(where, "block_out_channels", boc, f"every entry must be a multiple of the first, {ch}")
    if len(down) != len(boc) or len(up) != len(boc):
        _refuse(where, "down_block_types/up_block_types", (down, up), f"need {len(boc)} each")
    attn_levels = []
    for level, name in enumerate(down):
        if name not in ("DownBlock2D", "AttnDownBlock2D"):
            _refuse(where, f"down_block_types[{level}]", name, "DownBlock2D or AttnDownBlock2D")
        if name == "AttnDownBlock2D":
            attn_levels.append(level)
    for i, name in enumerate(up):
        if name not in ("UpBlock2D", "AttnUpBlock2D"):
            _refuse(where, f"up_block_types[{i}]", name, "UpBlock2D or AttnUpBlock2D")
        level = len(boc) - 1 - i
        if (name == "AttnUpBlock2D") != (level in attn_levels):
            _refuse(where, f"up_block_types[{i}]", name, f"fastddpm has attention on the way up exactly "
                    f"where down_block_types[{level}] has it ({down[level]})")
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        _refuse(where, "time_embedding_dim", cfg["time_embedding_dim"], f"the paper's is 4 x {ch} = {4 * ch}")
    if cfg["in_channels"] != cfg["out_channels"]:
        _refuse(where, "out_channels", cfg["out_channels"], f"must equal in_channels {cfg['in_channels']}")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        _refuse(where, "attn_norm_num_groups", cfg["attn_norm_num_groups"],
                f"must be null or norm_num_groups {cfg['norm_num_groups']}")
    if isinstance(size, (list, tuple)):  # a square one became an int above
        _refuse(where, "sample_size", size, "fastddpm's images are square")
    if not isinstance(size, int) or isinstance(size, bool):
        _refuse(where, "sample_size", size, "an int image size is needed")
    # one head count for every attention block (ours); diffusers fixes the head
    # dimension instead, so channels // attention_head_dim must agree
    head_dim = cfg["attention_head_dim"]
    attn_channels = sorted({boc[level] for level in attn_levels} | {boc[-1]})
    if head_dim is None:
        heads = 1
    else:
        if not isinstance(head_dim, int) or head_dim < 1 or any(c % head_dim for c in attn_channels):
            _refuse(where, "attention_head_dim", head_dim, f"must divide the attention channels {attn_channels}")
        counts = {c // head_dim for c in attn_channels}
        if len(counts) != 1:
            _refuse(where, "attention_head_dim", head_dim, f"gives {sorted(counts)} heads for attention "
                    f"channels {attn_channels}; fastddpm uses one head count everywhere")
        heads = counts.pop()
    try:
        return UNetConfig(image_size=size, in_channels=cfg["in_channels"], ch=ch,
                          ch_mult=tuple(c // ch for c in boc), num_res_blocks=cfg["layers_per_block"],
                          attn_resolutions=tuple(size // 2 ** level for level in attn_levels),
                          dropout=float(cfg["dropout"]), num_groups=cfg["norm_num_groups"],
                          eps=float(cfg["norm_eps"]), num_heads=heads)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def unet_config_to_diffusers(cfg) -> dict:
    """The UNet2DModel config.json of our UNetConfig (refused where diffusers has no equivalent)."""
    if cfg.ch_mult[0] != 1:
        raise CheckpointError(f"ch_mult={cfg.ch_mult} has no UNet2DModel equivalent (its first level keeps "
                              "the stem's channels: ch_mult[0] must be 1)")
    boc = [cfg.ch * m for m in cfg.ch_mult]
    attn_levels = [lv for lv, r in enumerate(cfg.resolutions) if r in cfg.attn_resolutions]
    attn_channels = sorted({boc[lv] for lv in attn_levels} | {boc[-1]})
    if cfg.num_heads == 1:
        head_dim = None  # diffusers: one head of all the channels in every block
    elif len(attn_channels) == 1:
        head_dim = attn_channels[0] // cfg.num_heads
    else:
        raise CheckpointError(f"num_heads={cfg.num_heads} with attention at {attn_channels} channels has no "
                              "UNet2DModel equivalent (it has one attention_head_dim, so the head count "
                              "would change with the channels)")
    n = len(boc)
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["AttnDownBlock2D" if lv in attn_levels else "DownBlock2D" for lv in range(n)],
        "up_block_types": ["AttnUpBlock2D" if n - 1 - i in attn_levels else "UpBlock2D" for i in range(n)],
        "block_out_channels": boc, "layers_per_block": cfg.num_res_blocks, "dropout": cfg.dropout,
        "attention_head_dim": head_dim, "norm_num_groups": cfg.num_groups, "norm_eps": cfg.eps,
        "act_fn": "silu", "time_embedding_dim": None, "attn_norm_num_groups": None,
        **UNET_REQUIRED,
    }


def diffusion_config_from_scheduler(raw: dict, where="scheduler_config.json"):
    """(GaussianDiffusion config, clip_sample) for a DDPMScheduler config."""
    cfg = _read_config(raw, "DDPMScheduler", SCHEDULER_DEFAULTS, SCHEDULER_REQUIRED, where, "fastddpm's sampler")
    ours = {v: k for k, v in VARIANCES.items()}
    if cfg["variance_type"] not in ours:
        _refuse(where, "variance_type", cfg["variance_type"], "fixed_large or fixed_small")
    variance = ours[cfg["variance_type"]]
    T = cfg["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        _refuse(where, "num_train_timesteps", T, "a positive int")
    if T > limits.MAX_T:
        _refuse(where, "num_train_timesteps", T, f"fastddpm's bound on the schedule length is {limits.MAX_T}")
    betas = cfg["trained_betas"]
    if betas is not None and not (isinstance(betas, list) and len(betas) == T
                                  and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        what = f"a list of {len(betas)}" if isinstance(betas, list) else f"a {type(betas).__name__}"
        _refuse(where, "trained_betas", what, f"a list of num_train_timesteps = {T} numbers")
    if betas is not None:
        dcfg = {"schedule": "custom", "betas": [float(b) for b in betas], "variance": variance}
    else:
        schedule = {v: k for k, v in SCHEDULES.items()}.get(cfg["beta_schedule"])
        if schedule is None:
            _refuse(where, "beta_schedule", cfg["beta_schedule"], f"one of {sorted(SCHEDULES.values())}")
        dcfg = {"schedule": schedule, "T": T, "variance": variance}
        if schedule != "cosine":
            for field in ("beta_start", "beta_end"):
                if not isinstance(cfg[field], (int, float)) or isinstance(cfg[field], bool):
                    _refuse(where, field, cfg[field], "a number")
                dcfg[field] = float(cfg[field])
    theirs = cfg["prediction_type"]
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(theirs) if isinstance(theirs, str) else None
    if prediction is None:
        _refuse(where, "prediction_type", theirs, f"one of {sorted(PREDICTIONS.values())}")
    if prediction != "eps":          # an eps config has no key (GaussianDiffusion.config)
        dcfg["prediction"] = prediction
    if not isinstance(cfg["clip_sample"], bool):
        _refuse(where, "clip_sample", cfg["clip_sample"], "true or false")
    from fastddpm.diffusion import GaussianDiffusion
    try:
        GaussianDiffusion.from_config(dcfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return dcfg, cfg["clip_sample"]


def scheduler_config_from_diffusion(dcfg: dict) -> dict:
    """The DDPMScheduler config of our diffusion config."""
    out = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
           "variance_type": VARIANCES[dcfg.get("variance", "fixedlarge")], "clip_sample": True,
           "prediction_type": PREDICTIONS[dcfg.get("prediction", "eps")]}
    if dcfg.get("schedule") == "custom":
        return {**out, "num_train_timesteps": len(dcfg["betas"]), "trained_betas": list(dcfg["betas"])}
    out.update(num_train_timesteps=dcfg["T"], beta_schedule=SCHEDULES[dcfg["schedule"]], trained_betas=None)
    if dcfg["schedule"] != "cosine":
        out.update(beta_start=dcfg["beta_start"], beta_end=dcfg["beta_end"])
    return out


# ---- weights --------------------------------------------------------------------

def _key_map(cfg):
    """[(our key prefix, their key prefix, kind)] for every layer; kind is "copy"
    (same tensors), "linear" (their Linear is our 1x1 conv) or "qkv" (their to_q,
    to_k, to_v stacked into our qkv)."""
    pairs = [("conv_in", "conv_in", "copy"), ("temb.dense0", "time_embedding.linear_1", "copy"),
             ("temb.dense1", "time_embedding.linear_2", "copy")]

    def res(ours, theirs, has_skip):
        pairs.extend((f"{ours}.{a}", f"{theirs}.{b}", "copy") for a, b in
                     (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"),
                      ("norm2", "norm2"), ("conv2", "conv2")))
        if has_skip:
            pairs.append((f"{ours}.skip", f"{theirs}.conv_shortcut", "copy"))

    def attn(ours, theirs):
        pairs.extend([(f"{ours}.norm", f"{theirs}.group_norm", "copy"), (f"{ours}.qkv", theirs, "qkv"),
                      (f"{ours}.proj", f"{theirs}.to_out.0", "linear")])

    chans = [cfg.ch * m for m in cfg.ch_mult]
    k, cur, skips = 0, cfg.ch, [cfg.ch]
    for level, c in enumerate(chans):
        has_attn = cfg.resolutions[level] in cfg.attn_resolutions
        for j in range(cfg.num_res_blocks):
            res(f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", cur != c)
            if has_attn:
                attn(f"down.{k}.1", f"down_blocks.{level}.attentions.{j}")
            cur = c
            skips.append(c)
            k += 1
        if level != len(chans) - 1:
            pairs.append((f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "copy"))
            skips.append(c)
            k += 1
    res("mid.0", "mid_block.resnets.0", False)
    attn("mid.1", "mid_block.attentions.0")
    res("mid.2", "mid_block.resnets.1", False)
    k = 0
    for i, level in enumerate(reversed(range(len(chans)))):
        c, has_attn = chans[level], cfg.resolutions[level] in cfg.attn_resolutions
        for j in range(cfg.num_res_blocks + 1):
            res(f"up.{k}.0", f"up_blocks.{i}.resnets.{j}", cur + skips.pop() != c)
            if has_attn:
                attn(f"up.{k}.1", f"up_blocks.{i}.attentions.{j}")
            cur = c
            k += 1
        if level != 0:
            pairs.append((f"up.{k}.0.conv", f"up_blocks.{i}.upsamplers.0.conv", "copy"))
            k += 1
    pairs += [("norm_out", "conv_norm_out", "copy"), ("conv_out", "conv_out", "copy")]
    return pairs


_OLD_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def state_dict_from_diffusers(sd: dict, cfg, where="weights") -> dict:
    """Our UNet state_dict from a UNet2DModel one (old attention names query /
    key / value / proj_attn accepted too). Missing, unexpected or misshapen
    tensors are refused by name."""
    sd = dict(sd)
    for key in list(sd):
        head, _, leaf = key.rpartition(".")  # "...attentions.0.query" + "weight"
        path, _, name = head.rpartition(".")
        if ".attentions." in key and name in _OLD_ATTN_NAMES:
            sd[f"{path}.{_OLD_ATTN_NAMES[name]}.{leaf}"] = sd.pop(key)
    out, used = {}, set()

    def take(key):
        if key not in sd:
            raise CheckpointError(f"{where}: tensor {key} is missing (the config needs it)")
        used.add(key)
        return sd[key]

    for ours, theirs, kind in _key_map(cfg):
        for leaf in ("weight", "bias"):
            if kind == "qkv":
                w = torch.cat([take(f"{theirs}.to_{n}.{leaf}") for n in "qkv"])
            else:
                w = take(f"{theirs}.{leaf}")
            if kind in ("qkv", "linear") and leaf == "weight" and w.dim() == 2:
                w = w[:, :, None, None]
            out[f"{ours}.{leaf}"] = w
    extra = sorted(set(sd) - used)
    if extra:
        raise CheckpointError(f"{where}: tensors {extra[:3]}{' ...' if len(extra) > 3 else ''} do not belong to "
                              "the network the config describes")
    _check_shapes(out, cfg, where)
    return out


def _check_shapes(sd, cfg, where):
    for key, shape in expected_shapes(cfg).items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(f"{where}: tensor for {key} has shape {tuple(sd[key].shape)}, the config "
                                  f"needs {shape}")


def state_dict_to_diffusers(sd: dict, cfg) -> dict:
    """A UNet2DModel state_dict from ours (contiguous tensors, as safetensors wants)."""
    out = {}
    for ours, theirs, kind in _key_map(cfg):
        for leaf in ("weight", "bias"):
            w = sd[f"{ours}.{leaf}"]
            if kind in ("qkv", "linear") and leaf == "weight":
                w = w.reshape(w.shape[0], w.shape[1])
            if kind == "qkv":
                for n, part in zip("qkv", w.chunk(3)):
                    out[f"{theirs}.to_{n}.{leaf}"] = part.contiguous().clone()
            else:
                out[f"{theirs}.{leaf}"] = w.contiguous().clone()
    return out


def _read_weights(folder):
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            break
    else:
        raise CheckpointError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = safe_torch_load(path)  # weights_only: never runs code
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch raise several kinds for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is unreadable (truncated, corrupt, or not plain tensors): {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors")
    return path, sd


def _first(*paths):
    return next((p for p in paths if os.path.exists(p)), None)


def load_folder(path) -> dict:
    """A diffusers folder as a checkpoint dict in our format: a pipeline
    (model_index.json with unet/ and scheduler/, or the flat layout of the
    google/ddpm-* repositories: config.json, scheduler_config.json and the
    weights side by side) or a UNet folder, which gets the paper's schedule
    (linear, T = 1000, fixedlarge) unless a scheduler_config.json lies beside it."""
    kind = folder_kind(path)
    if kind is None:
        raise CheckpointError(f"{path} is not a diffusers folder (no model_index.json, or config.json with "
                              f"{' / '.join(WEIGHT_FILES)})")
    source = "diffusers UNet2DModel"
    if kind == "pipeline":
        index_path = os.path.join(path, "model_index.json")
        index = read_json(index_path)
        for part, cls in (("unet", "UNet2DModel"), ("scheduler", "DDPMScheduler")):
            entry = index.get(part)
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == cls):
                _refuse(index_path, part, entry, f"fastddpm reads [\"diffusers\", \"{cls}\"]")
        source = f"diffusers {index.get('_class_name', 'pipeline')}"
    sub = os.path.join(path, "unet")
    unet_dir = sub if kind == "pipeline" and os.path.isfile(os.path.join(sub, "config.json")) else path
    sched = _first(os.path.join(path, "scheduler", "scheduler_config.json"),
                   os.path.join(path, "scheduler_config.json"))
    if kind == "pipeline" and sched is None:
        raise CheckpointError(f"{os.path.join(path, 'scheduler', 'scheduler_config.json')} is missing "
                              "(nor is there a scheduler_config.json beside model_index.json)")
    diffusion, clip = diffusion_config_from_scheduler(read_json(sched), sched) if sched else (None, True)
    cfg_path = os.path.join(unet_dir, "config.json")
    cfg = unet_config_from_diffusers(read_json(cfg_path), cfg_path)
    weights_path, raw = _read_weights(unet_dir)
    state = state_dict_from_diffusers(raw, cfg, weights_path)
    config = {"model": cfg.to_dict(), "source": {"format": source, "path": os.path.abspath(path)},
              "sampling": {"clip": clip}}
    if diffusion is not None:
        config["diffusion"] = diffusion
    return {"format": FORMAT, "version": VERSION, "step": None, "config": config, "model": state, "ema": None}


# ---- export ---------------------------------------------------------------------

def export_pipeline(ckpt: dict, dst, use_ema=True, where="checkpoint"):
    """Write checkpoint `ckpt` (our dict) as a DDPMPipeline folder `dst` (which
    must not exist or be empty): model_index.json, unet/config.json,
    unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json.
    EMA weights when present and use_ema. Written as one (fastddpm.files.atomic_folder),
    so dst is never half-written."""
    from safetensors.torch import save_file

    from fastddpm.checkpoint import build_model
    model, diffusion = build_model(ckpt, use_ema=use_ema, path=where)  # validates config and weights
    unet_cfg = unet_config_to_diffusers(model.config)
    sched_cfg = scheduler_config_from_diffusion(diffusion.config)
    # a checkpoint converted from a clip_sample=false scheduler keeps it (load_folder records it)
    sched_cfg["clip_sample"] = bool(((ckpt.get("config") or {}).get("sampling") or {}).get("clip", True))
    weights = state_dict_to_diffusers({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config)
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise CheckpointError(f"{dst} already exists and is not an empty folder")
    check_parent(dst, "pipeline folder")
    try:
        with files.atomic_folder(dst) as tmp:
            os.makedirs(os.path.join(tmp, "unet"))
            os.makedirs(os.path.join(tmp, "scheduler"))
            index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                     "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
            for rel, obj in (("model_index.json", index), ("unet/config.json", unet_cfg),
                             ("scheduler/scheduler_config.json", sched_cfg)):
                with open(os.path.join(tmp, rel), "w") as f:
                    json.dump(obj, f, indent=2)
                    f.write("\n")
            save_file(weights, os.path.join(tmp, "unet", WEIGHT_FILES[0]), metadata={"format": "pt"})
    except OSError as e:
        raise CheckpointError(f"cannot write {dst}: {e.strerror or e}") from None
    return dst
