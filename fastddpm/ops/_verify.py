"""How a fast path is checked against the reference at its first use (the
decisions themselves: fastddpm.ops._backend): outputs compared by relative error
(TOL, per dtype), both sides run from the same random stream (rng_get/rng_set)
and the same contents of the arguments written in place (swap_in), the reference
without TF32 (exact_fp32), gradients through fresh leaves (aliases), and timing
(measure; tests replace it with a fake timer). Holds no state."""
import contextlib
import math
import statistics
import time

import torch
from torch.utils import _pytree

# ||fast - reference|| / ||reference|| allowed, per dtype of the output (README.md, Dispatch; the
# half types as tests/_util.REL_TOL has them)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TIME_REPS = 5              # timed calls per implementation, after one warm-up
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
               torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.uint8: "u8"}


def error_text(what, e):
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{what}: {type(e).__name__}: {msg}"


@contextlib.contextmanager
def exact_fp32():
    """The reference as specified: fp32 matmuls and convolutions without TF32 (a
    trainer's --tf32 would make it the less exact of the two)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def rng_get(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def rng_set(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def swap_in(mutated, contents):
    """Copy `contents` into the in-place arguments; returns what they held."""
    held = [t.clone() for t in mutated]
    for t, c in zip(mutated, contents):
        t.copy_(c)
    return held


def compare(out, ref, scale=1.0):
    """(largest relative error, None) when `out` matches `ref` within TOL (times
    `scale`), else (None, why)."""
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            return None, "mismatch: it returns another structure than the reference"
        worst = 0.0
        for o, r in zip(out, ref):
            err, why = compare(o, r, scale)
            if why is not None:
                return None, why
            worst = max(worst, err)
        return worst, None
    if ref is None or out is None:
        return (0.0, None) if out is ref else (None, "mismatch: it returns None where the reference does not")
    if not isinstance(out, torch.Tensor):
        return None, f"mismatch: it returns {type(out).__name__}"
    if out.shape != ref.shape or out.dtype != ref.dtype or out.device != ref.device:
        return None, (f"mismatch: it returns {out.dtype} {tuple(out.shape)} on {out.device}, the reference "
                      f"{ref.dtype} {tuple(ref.shape)} on {ref.device}")
    o, r = out.detach().double(), ref.detach().double()
    finite = torch.isfinite(r)
    if not bool(finite.all()):
        if not torch.equal(torch.isfinite(o), finite) or not torch.equal(o[~finite].nan_to_num(0.0),
                                                                            r[~finite].nan_to_num(0.0)):
            return None, "mismatch: its non-finite values differ from the reference's"
        o, r = o.where(finite, 0.0), r.where(finite, 0.0)
    diff, norm = float((o - r).norm()), float(r.norm())
    err = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    tol = TOL.get(ref.dtype, 1e-5) * scale
    if not err <= tol:
        return None, f"mismatch: relative error {err:.1e} > {tol:.0e} ({DTYPE_NAMES.get(ref.dtype, ref.dtype)})"
    return err, None


def aliases(args, kwargs):
    """(args, kwargs) with every tensor that needs a gradient replaced by a fresh
    leaf sharing its memory; also the originals and the leaves, in one order."""
    leaves, spec = _pytree.tree_flatten((args, kwargs))
    real, alias = [], []
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            a = t.detach().requires_grad_()
            real.append(t)
            alias.append(a)
            leaves[i] = a
    a_args, a_kwargs = _pytree.tree_unflatten(leaves, spec)
    return a_args, a_kwargs, real, alias


def measure(op, backend, run, device):
    """Seconds per call of run(): the median of TIME_REPS calls after a warm-up
    (CUDA events on CUDA, the host clock elsewhere). Tests replace it with a fake timer."""
    times = []
    for _ in range(TIME_REPS + 1):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def timed(fn, args, kwargs, grad):
    if not grad:
        return lambda: fn(*args, **kwargs)

    def fwd_bwd():
        a, kw, _, leaves = aliases(args, kwargs)
        with torch.enable_grad():
            out = fn(*a, **kw)
            torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return fwd_bwd
