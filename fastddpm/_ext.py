"""Loads the optional C++ extension fastddpm._C. A missing or broken build never
breaks `import fastddpm`: the error is kept and reported by
`fastddpm.ops.available_backends`.

An extension built against another torch can crash the process when loaded
(C++ ABI), so it is loaded only when the torch version recorded at build time
(fastddpm/_C.torch_version, written by setup.py) equals the running one.
"""
import importlib.util
import os

import torch  # loads libc10/libtorch, which _C links against

_error = None
_VERSION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.torch_version")
_REBUILD = "rebuild it with `python setup.py build_ext --inplace` (or reinstall fastddpm)"
# every schema of csrc/ops.cpp: a _C built from older sources (same torch) lacks
# some, and registering their fake kernels would make `import fastddpm` raise
OPS = ("group_norm", "group_norm_backward", "q_sample", "simple_loss", "p_sample_step", "sample_step",
       "cpu_cache_stats", "cpu_empty_cache")
# an argument each op's current schema has and older builds lacked (same op name, new signature)
SCHEMA_ARGS = {"sample_step": "history"}


def _built_for():
    try:
        with open(_VERSION_FILE) as f:
            return f.read().strip()
    except OSError:
        return None


def _load():
    if importlib.util.find_spec("fastddpm._C") is None:
        return "fastddpm._C is not built; " + _REBUILD
    built = _built_for()
    if built is None:
        return f"fastddpm._C has no record of the torch it was built for ({_VERSION_FILE}); " + _REBUILD
    if built != torch.__version__:
        return f"fastddpm._C was built for torch {built} but torch {torch.__version__} is running; " + _REBUILD
    try:
        from fastddpm import _C  # noqa: F401  (import runs the TORCH_LIBRARY registrations)
    except Exception as e:  # ImportError, or an undefined symbol from an ABI mismatch
        return f"{type(e).__name__}: {e}"
    missing = [op for op in OPS if not hasattr(torch.ops.fastddpm_cpp, op)]
    if missing:
        return f"fastddpm._C is out of date (no fastddpm_cpp::{', '.join(missing)}); " + _REBUILD
    stale = [f"{op}({arg})" for op, arg in SCHEMA_ARGS.items()
             if arg not in [a.name for a in getattr(torch.ops.fastddpm_cpp, op).default._schema.arguments]]
    if stale:
        return f"fastddpm._C is out of date (older schema of fastddpm_cpp::{', '.join(stale)}); " + _REBUILD
    return None


_error = _load()


def has_extension() -> bool:
    return _error is None


def extension_error():
    """Why fastddpm._C could not be loaded, or None when it is loaded."""
    return _error
