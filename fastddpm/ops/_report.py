"""What the dispatch decided, for people: dispatch_report() lists every decision,
dispatch_summary() counts them in one line, report_dispatch() logs that line at
the start and after the first step (the train and sample CLIs), and
clear_dispatch_cache() forgets them all."""
import torch

from fastddpm.ops import _backend, _decisions


def dispatch_report(device=None) -> str:
    """Every decision of this process and of the cache file (for `device`, a
    torch.device or its name, or all): one line each, 'device | backend | key | reason'."""
    want = None
    if device is not None:
        device = torch.device(device)
        want = _backend._device_ids.get(device) or _backend._device_id(device)
    rows = {}
    for d, keys in _decisions.recorded().items():
        for k, (backend, reason) in keys.items():
            rows[(d, k)] = (backend, reason)
    for key, backend in _backend._decided.items():
        rows[(key[2], _backend.key_text(key))] = (backend, _backend._reasons.get(key, ""))
    lines = [f"{d} | {backend} | {k} | {reason}" for (d, k), (backend, reason) in sorted(rows.items())
             if want is None or d == want]
    head = (f"fastddpm dispatch: FASTDDPM_BACKEND={_backend._forced}, FASTDDPM_DISPATCH={_backend._mode}, "
            f"cache {_decisions.path()}: {len(lines)} decision(s)")
    return "\n".join([head] + lines)


def dispatch_summary() -> str:
    """One line: the mode and the decisions this process made or used, by backend and why."""
    if _backend._forced != "auto":
        return f"dispatch: backend {_backend._forced} forced (FASTDDPM_BACKEND or use_backend): no checks"
    if _backend._mode in ("trust", "reference"):
        return f"dispatch: FASTDDPM_DISPATCH={_backend._mode}: no checks"
    counts = {}
    for key, backend in _backend._decided.items():
        reason = _backend._reasons.get(key, "")
        why = ("verified" if reason.startswith("verified") and backend != "reference" else
               "slower" if "slower" in reason else reason.split(":", 1)[0])
        counts[(backend, why)] = counts.get((backend, why), 0) + 1
    parts = ", ".join(f"{n} {b} ({why})" for (b, why), n in sorted(counts.items()))
    pending = sum(1 for r in _backend._pending.values() if r() is not None)
    cached = sum(len(k) for k in _decisions.recorded().values())
    return (f"dispatch: {_backend._mode}, {len(_backend._decided)} key(s) decided in this run"
            + (f": {parts}" if parts else "") + (f"; {pending} awaiting their first backward" if pending else "")
            + f"; cache {_decisions.path()} ({cached} decision(s)); fastddpm.ops.dispatch_report() lists them")


def report_dispatch(model, log=print):
    """Log dispatch_summary() now and again at the start of `model`'s second
    forward (after the first training or sampling step: the first step's checks
    are done). The train and sample CLIs call it once."""
    log(dispatch_summary())

    @torch.compiler.disable
    def hook(module, args):
        hook.calls += 1
        if hook.calls == 2:
            handle.remove()
            log(dispatch_summary().replace("dispatch:", "dispatch after the first step:", 1))
    hook.calls = 0
    handle = model.register_forward_pre_hook(hook)
    return handle


def clear_dispatch_cache() -> list:
    """Forget every decision (this process's and the cache files'); returns the files removed."""
    _backend._decided.clear()
    _backend._checked.clear()
    _backend._reasons.clear()
    _backend._pending.clear()
    return _decisions.clear()
