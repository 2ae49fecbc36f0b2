"""Runtime settings every CLI shares: the device (--device), the precision
(--precision, autocast), torch.compile (--compile) and the memory format the
network runs in (--memory-format). None of them changes a checkpoint: weights are
the same numbers whatever device, precision, compile mode or layout ran them."""
import contextlib
import os

import torch

from fastddpm import ops

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# --compile of the train and sample CLIs: eager, or a torch.compile mode
# ("reduce-overhead" replays the network in CUDA graphs).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
# --memory-format of the train and sample CLIs: the layout the network runs in (a
# runtime choice: weights and checkpoints are the same numbers in either).
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def local_rank():
    """This process's GPU under torchrun (LOCAL_RANK), 0 outside it."""
    return int(os.environ.get("LOCAL_RANK", 0))


def parse_device(name, default_index=None):
    """The torch.device a --device value names: cpu, cuda or cuda:N (None: cuda if
    available, else cpu). A bare "cuda" (or None on a CUDA machine) gets
    default_index (the trainer passes local_rank()). Raises ValueError, naming
    the flag, for anything fastddpm cannot run on here."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):  # torch's own message lists every device type it knows
        raise ValueError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here")
        if device.index is None and default_index is not None:
            device = torch.device("cuda", default_index)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: fastddpm runs on cpu or cuda, not {device.type}")
    return device


def default_precision(device) -> str:
    """bf16 on a GPU that supports it, else fp32."""
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16
    autocast speeds training up (the tiny preset's step 1.35x, 2026-12-07); elsewhere
    bf16 is emulated and slower than fp32. torch's own probes (private: False if absent)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    except RuntimeError:  # cpuinfo could not read this CPU
        return False


def autocast(device, precision, cache_enabled=None):
    """Autocast context for a precision name; fp32 means none."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


def compile_model(model, mode):
    """`model` wrapped by torch.compile in `mode` (one of COMPILE_MODES), or
    itself for "none". Parameters stay shared with `model`, so optimizers,
    checkpoints (taken from `model`) and the EMA are unaffected. The first calls
    at each input shape pay the compilation."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return model
    return torch.compile(model, mode=mode)


def apply_memory_format(model, name, device):
    """Move `model` (in place) to the layout `name` (one of MEMORY_FORMATS; auto:
    ops.preferred_memory_format(device)) and return the torch.memory_format used.
    The UNet then runs in that layout and still returns contiguous NCHW."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format must be one of {MEMORY_FORMATS}, got {name!r}")
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}.get(name)
    fmt = ops.preferred_memory_format(device) if fmt is None else fmt
    model.to(memory_format=fmt)
    return fmt
