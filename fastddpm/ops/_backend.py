"""The one dispatch point: which implementation runs an op on a device.

Backends: "reference" (plain PyTorch, fastddpm.reference: the specification,
always there), "triton" (CUDA, or the CPU under TRITON_INTERPRET=1) and "cpp"
(fastddpm._C, CPU). Each op module registers its implementations here
(`register`, into the registry `_impls`: {op: {backend: fn}}), and its public
function runs `call(op, device, *args)`.

Forced (FASTDDPM_BACKEND=reference|triton|cpp, or `use_backend`): every op that
has that backend runs it as is, unchecked (the kernel tests rely on exactly
that); an op without it runs its reference; a backend that cannot run on the
input's device raises, naming why.

"auto" (the default): per op the fast candidate is Triton on CUDA, C++ on the
CPU where benchmarks/test_cpu.py measured it faster (CPU_AUTO_CPP). It runs only
where it has earned it, per key (op, backend, device name, and per argument its
dtype, layout, shape class and whether it needs a gradient; see _key), as
FASTDDPM_DISPATCH says:
  verify     (default) the first call at a key also runs the reference on the
             same inputs and the same random stream (replays), and compares the
             outputs by relative error (fastddpm.ops._verify.TOL); a key that needs gradients is
             decided at its first backward, which compares them too (until
             then every call there is checked so); on CUDA the first call also
             times both and keeps the faster. A failure or mismatch costs one
             line on stderr: the reference's answer is returned and the
             reference runs at that key from then on.
  measure    verify, and time both on the CPU too (every op with a C++ kernel)
  trust      the candidate unchecked (the behaviour before checks existed)
  reference  the reference everywhere
The cost: one reference call per key (plus a few timed calls of each where
measured), then a key built and looked up per call (~10 us). Decisions persist per versions and
device (fastddpm/ops/_decisions.py). Inside a torch.compile trace or a
CUDA-graph capture nothing is checked: a decision made by an earlier eager call
is used, else the reference runs. fastddpm.ops._verify holds how a check
compares and times; fastddpm.ops._report lists the decisions (dispatch_report).
"""
import contextlib
import importlib.util
import math
import os
import sys
import weakref

import torch

from fastddpm.ops import _decisions, _verify
from fastddpm.ops._checks import no_sync

BACKENDS = ("auto", "reference", "triton", "cpp")
MODES = ("verify", "measure", "trust", "reference")

_env = os.environ.get("FASTDDPM_BACKEND", "auto")
if _env not in BACKENDS:
    raise ValueError(f"FASTDDPM_BACKEND={_env!r} is not one of {BACKENDS}")
# A plain module attribute, not a ContextVar: torch.compile (dynamo) traces
# reads of module attributes but breaks the graph on ContextVar.get().
_forced = _env
_mode = os.environ.get("FASTDDPM_DISPATCH", "verify")
if _mode not in MODES:
    raise ValueError(f"FASTDDPM_DISPATCH={_mode!r} is not one of {MODES}")
_HAS_TRITON = importlib.util.find_spec("triton") is not None

# The registry: op name -> {backend: callable}; filled by each op module at import.
_impls: dict = {}
# (op, backend) -> the reference computed with that backend's random stream
# (dropout masks, in-kernel noise): what its output is compared with. Default: the reference.
_replays: dict = {}
_mutates: dict = {}        # op -> (positions of the tensor arguments it writes in place, their tolerance scale)
# auto preference order per device type
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}


def is_nhwc(x) -> bool:
    """A 4-D tensor laid out channels_last (and not also contiguous): the layout the
    C++ kernels read as NHWC; everything else they read as NCHW."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _group_norm_wants_cpp(x, num_groups=None, weight=None, bias=None, eps=None, act=None, add=None, dropout=0.0):
    # channels_last, the fused ResBlock dropout, or NCHW with >= 64 positions per
    # channel: C++; smaller NCHW (the UNets' 4x4): the reference
    return dropout > 0 or is_nhwc(x) or math.prod(x.shape[2:]) >= 64


# The one place that says which ops "auto" runs on the C++ kernels on the CPU:
# only where benchmarks/test_cpu.py measured them faster than the reference
# (the figures and dates: benchmarks/results/README.md, "CPU_AUTO_CPP").
# An op missing here runs the reference under "auto" on the CPU; a value other
# than None is a predicate on the op's arguments.
CPU_AUTO_CPP = {
    "q_sample": None,
    "simple_loss": None,
    "p_sample_step": None,
    "p_sample_step_seeded": None,
    "sample_step": None,
    "group_norm": _group_norm_wants_cpp,
}


def preferred_memory_format(device) -> torch.memory_format:
    """The activation/weight layout a model should run in on `device` (train and
    sample --memory-format auto). Here, beside CPU_AUTO_CPP, because the two must
    agree: channels_last on the CPU when fastddpm._C loaded and the forced
    backend is "auto" or "cpp" (its GroupNorm kernels read NHWC natively and
    oneDNN's convolutions measured faster so: benchmarks/results/README.md);
    contiguous otherwise (torch's own CPU GroupNorm is slow on channels_last, so
    "reference" stays NCHW). CUDA: contiguous until channels_last is measured on a GPU."""
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


def register(op: str, backend: str, fn, replay=None, mutates=(), mutated_scale=None) -> None:
    """Register `fn` as `op`'s implementation on `backend`. replay: for a fast
    path that draws random numbers its own way (a dropout mask, in-kernel
    noise), the reference computed with that same stream, called with the
    generators rewound to where the fast path started; the check compares with
    it (or with the reference where it returns None: nothing of its own drawn).
    mutates: the positions of the tensor arguments the op writes in place (a
    sampler's history ring): the first-use check compares what each side wrote
    there too, from the same starting contents. Every implementation of an op
    must write the same arguments, so the positions are the op's (the last
    registration's that names any). mutated_scale(*args, **kwargs): how much the
    op amplifies its inputs' rounding in what it writes there (a float >= 1 that
    multiplies the dtype's tolerance for those tensors only), for a write that is
    ill-conditioned by construction."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}")
    _impls.setdefault(op, {})[backend] = fn
    if replay is not None:
        _replays[(op, backend)] = replay
    if mutates:
        _mutates[op] = (tuple(mutates), mutated_scale)


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


def _auto_backend(op: str, device: torch.device) -> str:
    """The backend "auto" tries first for `op` on `device`, before per-argument rules and checks."""
    impls = _impls[op]
    if _mode == "reference":
        return "reference"
    # The Triton interpreter is for tests: auto never picks it on the CPU.
    for b in _AUTO_ORDER.get(device.type, ("reference",)):
        if b == "cpp" and device.type == "cpu" and op not in CPU_AUTO_CPP and _mode != "measure":
            continue
        if b in impls and _unavailable(b, device) is None:
            return b
    return "reference"


def pick(op: str, device: torch.device):
    """The implementation of `op` that the forced backend runs on `device`; under
    "auto", the candidate before per-argument rules and first-use checks."""
    impls = _impls[op]
    forced = _forced
    if forced == "auto":
        return impls[_auto_backend(op, device)]
    if forced not in impls:
        return impls["reference"]
    why = _unavailable(forced, device)
    if why is not None:
        raise RuntimeError(f"backend {forced!r} was forced for {op} but cannot run: {why}")
    return impls[forced]


def call(op: str, device: torch.device, *args, **kwargs):
    """Run `op` on `args` (inputs on `device`) with the implementation the dispatch chooses."""
    if _forced != "auto":
        return pick(op, device)(*args, **kwargs)
    impls = _impls[op]
    fast = _auto_backend(op, device)
    if fast == "reference" or (fast == "cpp" and _mode != "measure" and not auto_wants_cpp(op, *args, **kwargs)):
        return impls["reference"](*args, **kwargs)
    if _mode == "trust":
        return impls[fast](*args, **kwargs)
    key = _key(op, fast, device, args, kwargs)
    backend = _decided.get(key)
    if backend is not None and _checked[key] is impls[fast]:
        return impls[backend](*args, **kwargs)
    if no_sync():  # a trace or a capture: never a check
        return impls["reference"](*args, **kwargs)
    return _first_use(op, fast, key, device, args, kwargs)


# ----------------------------------------------------------------------------- keys

_decided: dict = {}        # key -> backend: what runs there (the hot path reads this and _checked)
_checked: dict = {}        # key -> the fast implementation decided about (one registered later is checked anew)
_reasons: dict = {}        # key -> why
_pending: dict = {}        # key -> weakref to its latest forward-checked call whose backward is not checked yet
_device_ids: dict = {}     # torch.device -> "cuda NVIDIA H100 80GB HBM3 sm_90" / "cpu <model name>"
_BIG = -1000               # the class of an int argument above 2^16 (a seed, an offset)


def _device_id(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda {p.name} sm_{p.major}{p.minor}"
    if device.type == "cpu":
        name = ""
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
        import platform
        return f"cpu {name or platform.processor() or platform.machine()}"[:200]
    return device.type


def _dim(n):
    """A size's class: itself up to 16 (kernels branch on small sizes), else the
    power of two it rounds up to (-k for sizes in (2^(k-1), 2^k]), -64 - k when
    it is a multiple of 16 (what Triton specialises on)."""
    if n <= 16:
        return n
    k = (n - 1).bit_length()
    return -64 - k if n % 16 == 0 else -k


def _layout(t):
    if t.is_contiguous():
        return "c"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    for i in range(t.dim() - 1, -1, -1):   # strided: which dimension is the unit-stride one
        if t.stride(i) == 1:
            return f"s{i}"
    return "s"


def _sig(a, grad):
    """What a kernel may specialise on, of one argument."""
    if isinstance(a, torch.Tensor):
        # a view's start off 16 bytes is a Triton specialisation of its own; dynamo cannot
        # read storage offsets, so a trace takes it as aligned (most views are)
        aligned = torch.compiler.is_compiling() or (a.storage_offset() * a.element_size()) % 16 == 0
        return (a.dtype, _layout(a) if aligned else _layout(a) + "u", tuple(_dim(n) for n in a.shape),
                grad and a.requires_grad)
    if a is None or isinstance(a, (bool, str)):
        return a
    if isinstance(a, int):   # a count (num_groups, heads) by its class; a seed or an offset: "big"
        return _dim(a) if 0 <= a <= 65536 else (_BIG if a > 0 else -2000)
    if isinstance(a, float):
        return 0.0 if a == 0 else 1.0
    if isinstance(a, (tuple, list)):
        return tuple(_sig(v, grad) for v in a)
    if isinstance(a, torch.dtype):
        return str(a)
    return type(a).__name__


def _key(op, backend, device, args, kwargs):
    grad = torch.is_grad_enabled()
    sigs = tuple(_sig(a, grad) for a in args) + tuple((k, _sig(v, grad)) for k, v in kwargs.items())
    return (op, backend, _device_ids.get(device), "fwd+bwd" if _any_grad(sigs) else "fwd", sigs)


def _any_grad(s):
    if isinstance(s, tuple):
        if len(s) == 4 and isinstance(s[0], torch.dtype):
            return s[3]
        return any(_any_grad(v) for v in s)
    return False


def _dim_text(v):
    if v >= 0:
        return str(v)
    if v == _BIG:
        return ">65536"
    if v == -2000:
        return "<0"
    k = -v - 64 if v <= -64 else -v
    return f"{2 ** (k - 1) + 1}..{2 ** k}" + ("/16" if v <= -64 else "")


def _sig_text(s):
    if isinstance(s, tuple) and len(s) == 4 and isinstance(s[0], torch.dtype):
        dtype, layout, shape, grad = s
        return (f"{_verify.DTYPE_NAMES.get(dtype, str(dtype).replace('torch.', ''))} {layout} "
                f"({','.join(_dim_text(v) for v in shape)})" + (" grad" if grad else ""))
    if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) and not isinstance(s[1], str):
        return f"{s[0]}={_sig_text(s[1])}"
    if isinstance(s, tuple):
        return "[" + "; ".join(_sig_text(v) for v in s) + "]"
    if isinstance(s, int) and not isinstance(s, bool):
        return _dim_text(s)
    if isinstance(s, float):
        return "0.0" if s == 0 else "f"
    return str(s)


def key_text(key) -> str:
    """The key as written to the cache and the report (without the device), naming the
    fast implementation: another one registered in another process is checked anew."""
    op, backend, _device, direction, sigs = key
    fn = _checked.get(key) or _impls[op][backend]
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    return f"{op} {backend} {direction} ({name}): " + "; ".join(_sig_text(s) for s in sigs)


# ----------------------------------------------------------------------------- first use

def _decide(key, backend, reason, persist=True):
    _decided[key] = backend
    _checked[key] = _impls[key[0]][key[1]]
    _reasons[key] = reason
    _pending.pop(key, None)
    if persist:
        _decisions.record(key[2], key_text(key), backend, reason)


def _first_use(op, fast, key, device, args, kwargs):
    impls = _impls[op]
    ref = impls["reference"]
    if key[2] is None:
        _device_ids[device] = _device_id(device)
        key = key[:2] + (_device_ids[device],) + key[3:]
        if key in _decided and _checked[key] is impls[fast]:
            return impls[_decided[key]](*args, **kwargs)
    saved = None if key in _decided else _decisions.lookup(key[2], key_text(key))   # else: a new implementation
    if saved is not None and saved[0] in impls:
        _decide(key, saved[0], saved[1], persist=False)
        return impls[saved[0]](*args, **kwargs)
    replay = _replays.get((op, fast), ref)
    if key[3] == "fwd+bwd":
        return _check_with_grad(op, fast, key, device, impls[fast], ref, replay, args, kwargs)

    positions, scale_of = _mutates.get(op, ((), None))
    mutated = [args[i] for i in positions if i < len(args) and isinstance(args[i], torch.Tensor)]
    start = [t.clone() for t in mutated]   # both sides write from the same contents
    rng0 = _verify.rng_get(device)
    try:
        out, failure = impls[fast](*args, **kwargs), None
    except Exception as e:  # noqa: BLE001  (any failure of a fast path: the reference answers)
        out, failure = None, _verify.error_text("error", e)
    rng_fast = _verify.rng_get(device)
    _verify.rng_set(device, rng0)
    wrote_fast = _verify.swap_in(mutated, start)
    with _verify.exact_fp32():
        expected = replay(*args, **kwargs)
        if expected is None:   # a replay with nothing of its own to draw here: the reference
            replay, expected = ref, ref(*args, **kwargs)
    wrote_ref = [t.clone() for t in mutated]
    err = None
    if failure is None:
        err, failure = _verify.compare(out, expected)
    if failure is None and mutated:
        err_m, failure = _verify.compare(wrote_fast, wrote_ref, scale_of(*args, **kwargs) if scale_of else 1.0)
        err = None if failure else max(err, err_m)
    if failure is None:
        reason = f"verified (rel err {err:.0e})"
        backend, reason = _measured(op, fast, key, device, impls[fast], ref, args, kwargs, reason, grad=False)
        if backend == fast:
            _decide(key, fast, reason)
            _verify.rng_set(device, rng_fast)
            _verify.swap_in(mutated, wrote_fast)   # as if the fast path alone had run
            return out
        _decide(key, "reference", reason)
    else:
        _fail(key, failure)
    if replay is not ref:  # the reference's own stream, as if it alone had run
        _verify.rng_set(device, rng0)
        _verify.swap_in(mutated, start)
        return ref(*args, **kwargs)
    _verify.swap_in(mutated, wrote_ref)
    return expected


def _fail(key, failure):
    _decide(key, "reference", failure)
    print(f"fastddpm: {key[0]} ({key[1]}) failed its first-use check on {key[2]} at [{key_text(key)}]: "
          f"{failure}; the reference runs there from now on", file=sys.stderr)


# ----------------------------------------------------------------------------- gradients


class _GradCheck:
    """A forward that matched: both graphs kept until the key's first backward compares them."""

    def __init__(self, key, fast_out, fast_leaves, ref_out, ref_leaves, reason):
        self.key, self.reason = key, reason
        self.fast = (fast_out, fast_leaves)
        self.ref = (ref_out, ref_leaves)

    def backward(self, grad):
        (f_out, f_in), (r_out, r_in) = self.fast, self.ref
        self.fast = self.ref = None
        # compared at a random cotangent too: the caller's may make a gradient vanish
        # (GroupNorm then a sum), leaving rounding noise to compare; own generator, the user's untouched
        gen = torch.Generator(device=grad.device).manual_seed(0)
        probe = torch.randn(grad.shape, generator=gen, device=grad.device).to(grad.dtype)
        try:
            f_probe = torch.autograd.grad(f_out, f_in, probe, allow_unused=True, retain_graph=True)
            f_grads, failure = torch.autograd.grad(f_out, f_in, grad, allow_unused=True), None
        except Exception as e:  # noqa: BLE001
            f_grads, failure = None, _verify.error_text("backward error", e)
        with _verify.exact_fp32():
            r_probe = torch.autograd.grad(r_out, r_in, probe, allow_unused=True, retain_graph=True)
            r_grads = torch.autograd.grad(r_out, r_in, grad, allow_unused=True)
        if failure is None:
            filled = [(f if f is not None else torch.zeros_like(x), r if r is not None else torch.zeros_like(x))
                      for f, r, x in zip(f_probe, r_probe, r_in)]
            err, failure = _verify.compare([f for f, _ in filled], [r for _, r in filled])
            if failure is not None:
                failure = "backward " + failure
        if failure is None:  # this call's gradients matched: use them; the key's first such match decides
            if self.key not in _decided:
                _decide(self.key, self.key[1], self.reason.replace(")", f", bwd {err:.0e})", 1))
            return f_grads
        if _decided.get(self.key) != "reference":
            _fail(self.key, failure)
        return r_grads


class _Checked(torch.autograd.Function):
    """Hands the fast output to the caller's graph; its backward runs _GradCheck."""

    @staticmethod
    def forward(ctx, check, *leaves):
        ctx.check = check
        return check.fast[0].detach()

    @staticmethod
    def backward(ctx, grad):
        check, ctx.check = ctx.check, None
        return (None, *check.backward(grad))


def _check_with_grad(op, fast, key, device, impl, ref, replay, args, kwargs):
    rng0 = _verify.rng_get(device)
    f_args, f_kwargs, real, f_leaves = _verify.aliases(args, kwargs)
    try:
        with torch.enable_grad():
            out, failure = impl(*f_args, **f_kwargs), None
    except Exception as e:  # noqa: BLE001
        out, failure = None, _verify.error_text("error", e)
    rng_fast = _verify.rng_get(device)
    _verify.rng_set(device, rng0)
    r_args, r_kwargs, _, r_leaves = _verify.aliases(args, kwargs)
    with torch.enable_grad(), _verify.exact_fp32():
        expected = replay(*r_args, **r_kwargs)
        if expected is None:
            expected = ref(*r_args, **r_kwargs)
    err = None
    if not isinstance(expected, torch.Tensor):
        failure = failure or "not checked: gradients through several outputs"
    if failure is None:
        err, failure = _verify.compare(out, expected)
    if failure is None and not out.requires_grad:
        failure = "mismatch: its output has no gradient"
    if failure is None:
        # Every call at the key is checked until its first backward decides (so that the
        # first step computes what later ones do); the first is also timed.
        live = _pending.get(key)
        live = live() if live is not None else None
        reason = f"verified (fwd {err:.0e})"
        if live is None:
            backend, reason = _measured(op, fast, key, device, impl, ref, args, kwargs, reason, grad=True)
        else:
            backend, reason = fast, reason + live.reason[live.reason.index(")") + 1:]
        if backend == fast:
            check = _GradCheck(key, out, f_leaves, expected, r_leaves, reason)
            _pending[key] = weakref.ref(check)
            _verify.rng_set(device, rng_fast)
            return _Checked.apply(check, *real)
        _decide(key, "reference", reason)
    else:
        _fail(key, failure)
    _verify.rng_set(device, rng0)
    return ref(*args, **kwargs)   # the reference, in the caller's graph, with its own stream


# ----------------------------------------------------------------------------- measured choice


def _measured(op, fast, key, device, impl, ref, args, kwargs, reason, grad):
    """(backend, reason): on CUDA (or in measure mode) the faster of the verified
    fast path and the reference, timed on these inputs; else the fast path."""
    if not (device.type == "cuda" or _mode == "measure"):
        return fast, reason
    rng = _verify.rng_get(device)
    try:
        t_fast = _verify.measure(op, fast, _verify.timed(impl, args, kwargs, grad), device)
        t_ref = _verify.measure(op, "reference", _verify.timed(ref, args, kwargs, grad), device)
    except Exception as e:  # noqa: BLE001
        return "reference", _verify.error_text("error while timed", e)
    finally:
        _verify.rng_set(device, rng)
    if t_fast < t_ref:
        return fast, f"{reason}, {t_ref / t_fast:.2f}x faster ({t_fast * 1e6:.0f} us vs {t_ref * 1e6:.0f} us)"
    return "reference", (f"{reason} but slower: {t_fast / t_ref:.2f}x the reference's time "
                         f"({t_fast * 1e6:.0f} us vs {t_ref * 1e6:.0f} us)")
