"""The one dispatch point: which implementation runs an op on a device.

Backends: "reference" (plain PyTorch, always there), "triton" (CUDA, or the CPU
under TRITON_INTERPRET=1), "cpp" (fastddpm._C, CPU). "auto" picks the fastest
usable one per op and device. A forced backend (FASTDDPM_BACKEND or
`use_backend`) is used for every op that has it; an op without an
implementation of that backend runs its reference. Forcing a backend that
cannot run on the input's device raises, naming why.
"""
import contextlib
import importlib.util
import math
import os

import torch

BACKENDS = ("auto", "reference", "triton", "cpp")

_env = os.environ.get("FASTDDPM_BACKEND", "auto")
if _env not in BACKENDS:
    raise ValueError(f"FASTDDPM_BACKEND={_env!r} is not one of {BACKENDS}")
# A plain module attribute, not a ContextVar: torch.compile (dynamo) traces
# reads of module attributes but breaks the graph on ContextVar.get().
_forced = _env
_HAS_TRITON = importlib.util.find_spec("triton") is not None

# op name -> {backend: callable}; filled by each op module at import.
_impls: dict = {}
# auto preference order per device type
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

def is_nhwc(x) -> bool:
    """A 4-D tensor laid out channels_last (and not also contiguous): the layout the
    C++ kernels read as NHWC; everything else they read as NCHW."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# The one place that says which ops "auto" runs on the C++ kernels on the CPU:
# only where benchmarks/test_cpu.py measured them faster than the reference.
# An op missing here runs the reference under "auto" on the CPU; a value other
# than None is a predicate on the op's arguments (the C++ wrapper asks it).
# Measured 2026-12-01 13:19-13:26 UTC by benchmarks/test_cpu.py (four runs, the last two
# saved in benchmarks/results/cpu-amd-epyc-2core-2026-12-01.*) on the shared 2-core CI
# machine (AMD EPYC Zen 4, AVX-512, load average 0.7-1.3), fp32, medians of per-round
# ratios reference / C++ (each provider's steady state: blocks of 5 runs), 1 thread (2 threads):
#   p_sample_step (256, 3, 32, 32): 3.1-4.0x (3.1-4.6x);  q_sample + L_simple fwd+bwd: 1.24-1.32x (1.20-1.25x);
#   sample_step (256, 3, 32, 32): Philox noise drawn in the op 14-18x (19-26x), given noise +
#   x0_prev 3.1-4.4x (4.9-5.6x), no noise (DDIM) 3.6-5.7x (3.1-5.9x);
#   GroupNorm+SiLU fwd+bwd (8, 128, 32, 32): NCHW 1.58-3.50x (1.78-2.22x), channels_last
#   1.92-3.25x (2.40-2.81x; torch's channels_last result is also wrong at mean 3000);
#   GroupNorm+add+SiLU+dropout vs the unfused reference: 4.7-4.9x (6.6-7.5x).
# NCHW GroupNorm+SiLU fwd+bwd at the tiny UNet's sizes (same day, 13:30 UTC, the same
# method, 1 and 2 threads; without / with the ResBlock's add): 1.32-1.36x / 1.54-1.55x at
# (32, 16, 16, 16), 1.13-1.15x / 1.23-1.24x at (32, 32, 8, 8), 0.84-0.85x / 0.90-0.92x at
# (32, 64, 4, 4), 0.83-0.87x / 0.80-0.92x at (32, 128, 4, 4): C++ from 64 positions per
# channel, the reference below. (The reference's time moves by up to 2x between processes
# on this machine, with the page faults of fresh allocations: hence ranges.)
CPU_AUTO_CPP = {
    "q_sample": None,
    "simple_loss": None,
    "p_sample_step": None,
    "p_sample_step_seeded": None,
    "sample_step": None,
    # channels_last, the fused ResBlock dropout, or NCHW with >= 64 positions per
    # channel: C++; smaller NCHW (the UNets' 4x4): the reference
    "group_norm": lambda x, *args, dropout=0.0, **kw: dropout > 0 or is_nhwc(x) or math.prod(x.shape[2:]) >= 64,
}


def preferred_memory_format(device) -> torch.memory_format:
    """The activation/weight layout a model should run in on `device` (train and
    sample --memory-format auto). Here, beside CPU_AUTO_CPP, because the two must
    agree: channels_last on the CPU when fastddpm._C loaded and the forced
    backend is "auto" or "cpp" (its GroupNorm kernels read NHWC natively and
    oneDNN's convolutions were measured 5-15% faster channels_last: tiny UNet
    train step profiled, 1 and 2 threads, fp32, 2026-12-01); contiguous otherwise (torch's own
    CPU GroupNorm is slow on channels_last, so "reference" stays NCHW). CUDA:
    contiguous until channels_last is measured on a GPU."""
    device = torch.device(device)
    if device.type == "cpu" and _forced in ("auto", "cpp") and _unavailable("cpp", device) is None:
        return torch.channels_last
    return torch.contiguous_format


def auto_wants_cpp(op: str, *args, **kwargs) -> bool:
    """Whether "auto" on the CPU should run `op` on these arguments in C++ (see CPU_AUTO_CPP)."""
    if op not in CPU_AUTO_CPP:
        return False
    rule = CPU_AUTO_CPP[op]
    return rule is None or bool(rule(*args, **kwargs))


def register(op: str, backend: str, fn) -> None:
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}")
    _impls.setdefault(op, {})[backend] = fn


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside the block: "reference", "triton", "cpp" or "auto"."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def current_backend() -> str:
    return _forced


def _unavailable(backend: str, device: torch.device):
    """None when `backend` can run on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpp":
        from fastddpm._ext import extension_error
        if device.type != "cpu":
            return f"the C++ extension has CPU kernels only, input is on {device}"
        return extension_error() and f"fastddpm._C did not load ({extension_error()})"
    if backend == "triton":
        if not _HAS_TRITON:
            return "triton is not installed"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "Triton runs on the CPU only under TRITON_INTERPRET=1"
        return f"Triton does not run on {device.type}"
    return f"unknown backend {backend!r}"


def available_backends(device="cpu") -> dict:
    """{backend: None if usable on `device`, else the reason it is not}."""
    device = torch.device(device)
    return {b: _unavailable(b, device) for b in BACKENDS if b != "auto"}


def pick(op: str, device: torch.device):
    """The implementation of `op` to run for inputs on `device`."""
    impls = _impls[op]
    forced = _forced
    if forced == "auto":
        # The Triton interpreter is for tests: auto never picks it on the CPU.
        order = _AUTO_ORDER.get(device.type, ("reference",))
        if device.type == "cpu" and op not in CPU_AUTO_CPP:
            order = tuple(b for b in order if b != "cpp")
        for b in order:
            if b in impls and _unavailable(b, device) is None:
                return impls[b]
        return impls["reference"]
    if forced not in impls:
        return impls["reference"]
    why = _unavailable(forced, device)
    if why is not None:
        raise RuntimeError(f"backend {forced!r} was forced for {op} but cannot run: {why}")
    return impls[forced]
