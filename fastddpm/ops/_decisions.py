"""The dispatch's decisions on disk: which backend runs each key on a device, and why.

One small JSON file per set of versions, in the user's cache folder
(cache_dir(): $FASTDDPM_CACHE_DIR, else $XDG_CACHE_HOME/fastddpm, else
~/.cache/fastddpm), named dispatch-<hash>.json; the hash covers the versions of
torch, triton and fastddpm and a digest of the fast paths' code (ops, kernels,
the reference, fastddpm._C's size and mtime), so a decision is never reused by
other code, and a mismatch is kept until that code changes. Inside, decisions
are grouped by device (its name and capability): {device: {key: [backend, reason]}}.

The file is untrusted input: read only when it is a regular file under
MAX_BYTES, parsed as JSON (never unpickled), checked field by field; a file
that fails any check, or carries other versions, is ignored without a word and
replaced at the next write. Writes are atomic (fastddpm.files.write_atomic).
A folder that cannot be written costs one line on stderr; the decisions then
hold for this process only.
"""
import glob
import hashlib
import json
import os
import sys

import torch

from fastddpm import files

FORMAT = 1
MAX_BYTES = 1 << 20        # the file is read only below this size
MAX_KEYS = 4096            # per file: keys beyond it stay in memory
_MAX_TEXT = 400            # longest key or reason kept
BACKENDS = ("reference", "triton", "cpp")

_loaded = None             # {device: {key: (backend, reason)}} from the file, once read
_tag = None                # (versions dict, file name), computed once
_warned = False


def cache_dir() -> str:
    d = os.environ.get("FASTDDPM_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastddpm")


def _code_digest() -> str:
    """What the fast paths and the reference are: their Python sources, and the
    C++ extension's size and mtime (hashing its 25 MB on every start would cost more)."""
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = os.path.dirname(here)
    files = sorted(glob.glob(os.path.join(here, "*.py"))) + [os.path.join(pkg, "reference.py")]
    spec = importlib.util.find_spec("fastddpm.kernels")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        files += sorted(glob.glob(os.path.join(loc, "*.py")))
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        try:
            with open(f, "rb") as fh:
                h.update(os.path.basename(f).encode() + b"\0" + fh.read())
        except OSError:
            h.update(f.encode())
    for so in sorted(glob.glob(os.path.join(pkg, "_C*.so")) + glob.glob(os.path.join(pkg, "_C*.pyd"))):
        st = os.stat(so)
        h.update(f"{os.path.basename(so)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def versions() -> dict:
    global _tag
    if _tag is None:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        v = {"format": FORMAT, "torch": torch.__version__, "triton": triton_version,
             "fastddpm": getattr(sys.modules.get("fastddpm"), "__version__", None), "code": _code_digest()}
        name = "dispatch-" + hashlib.blake2b(json.dumps(v, sort_keys=True).encode(), digest_size=8).hexdigest()
        _tag = (v, name + ".json")
    return _tag[0]


def path() -> str:
    versions()
    return os.path.join(cache_dir(), _tag[1])


def _text(s):
    return isinstance(s, str) and 0 < len(s) <= _MAX_TEXT


def _read() -> dict:
    """The file's decisions, or {} when it is missing, too big, malformed or of other versions."""
    p = path()
    try:
        st = os.stat(p)
        if not os.path.isfile(p) or st.st_size > MAX_BYTES:
            return {}
        with open(p, "rb") as f:
            data = json.loads(f.read(MAX_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("versions") != versions():
        return {}
    table = data.get("decisions")
    if not isinstance(table, dict):
        return {}
    out, n = {}, 0
    for device, keys in table.items():
        if not _text(device) or not isinstance(keys, dict):
            return {}
        for key, value in keys.items():
            n += 1
            if n > MAX_KEYS or not _text(key) or not isinstance(value, list) or len(value) != 2 \
                    or value[0] not in BACKENDS or not _text(value[1]):
                return {}
            out.setdefault(device, {})[key] = (value[0], value[1])
    return out


def lookup(device: str, key: str):
    """(backend, reason) recorded for `key` on `device`, or None."""
    global _loaded
    if _loaded is None:
        _loaded = _read()
    return _loaded.get(device, {}).get(key)


def recorded(device: str = None) -> dict:
    """{device: {key: (backend, reason)}} in the file (and recorded by this process)."""
    if _loaded is None:
        lookup("", "")
    return {d: dict(k) for d, k in _loaded.items() if device is None or d == device}


def record(device: str, key: str, backend: str, reason: str) -> None:
    """Keep a decision, in memory and in the file (merged with what other processes wrote)."""
    global _loaded, _warned
    if _loaded is None:
        lookup("", "")
    reason = reason[:_MAX_TEXT]
    _loaded.setdefault(device, {})[key] = (backend, reason)
    merged = _read()
    for d, keys in _loaded.items():
        merged.setdefault(d, {}).update(keys)
    if sum(len(k) for k in merged.values()) > MAX_KEYS or len(key) > _MAX_TEXT:
        return
    payload = {"versions": versions(),
               "decisions": {d: {k: list(v) for k, v in keys.items()} for d, keys in merged.items()}}
    p = path()
    try:
        files.write_atomic(p, json.dumps(payload, indent=0))
    except OSError as e:
        if not _warned:
            _warned = True
            print(f"fastddpm: cannot write the dispatch cache {p} ({e.strerror or e}); "
                  "decisions hold for this process only", file=sys.stderr)


def clear() -> list:
    """Remove every dispatch-*.json in cache_dir() (all versions) and forget the
    decisions read from them. Returns the removed paths."""
    global _loaded
    removed = []
    for f in glob.glob(os.path.join(cache_dir(), "dispatch-*.json")):
        try:
            os.unlink(f)
            removed.append(f)
        except OSError:
            pass
    _loaded = {}
    return removed


def forget() -> None:
    """Drop what was read (tests: the next lookup reads the file again)."""
    global _loaded
    _loaded = None
