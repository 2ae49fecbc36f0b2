"""Record every finished test and benchmark as it finishes, so a run that is
killed (a time cap, a lost machine) keeps what it did.

As a pytest plugin (`-p jsonl_log` with benchmarks/ on sys.path; run_gpu.sh
does this): when $FASTDDPM_JSONL is set, one JSON line per test is appended to
that file right after the test ends: nodeid, stage ($FASTDDPM_STAGE), outcome,
duration, the skip reason or the failure's last lines, and for pytest-benchmark
tests the timing stats, group and extra_info (GPU times, GB/s, ...). Appends
are whole lines with O_APPEND, so parallel pytest processes can share a file.

With $FASTDDPM_DONE set to an earlier run's JSONL, the tests recorded there as
passed, failed or skipped are deselected: a rerun does only what is left. A
collection error (a test file that does not import) is recorded too.

As a script, it turns such a file into the pytest-benchmark JSON that
benchmarks/render.py reads:

    python benchmarks/jsonl_log.py bench RESULTS.jsonl DEVICE.json OUT.json
    python benchmarks/jsonl_log.py summary RESULTS.jsonl     (counts per stage and outcome)
"""
import json
import os
import sys
import time

import pytest

_STATS = ("min", "max", "mean", "median", "stddev", "iqr", "q1", "q3", "rounds", "ops")


def append(record, path=None):
    """Append one record as a JSON line to `path` (default $FASTDDPM_JSONL; no-op if unset)."""
    path = path or os.environ.get("FASTDDPM_JSONL")
    if not path:
        return
    line = json.dumps(record, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _benchmark_record(item):
    bench = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(bench, "stats", None) if bench is not None else None
    if meta is None or getattr(meta, "stats", None) is None:
        return None
    stats = {k: getattr(meta.stats, k, None) for k in _STATS}
    params = getattr(getattr(item, "callspec", None), "params", None)
    return {"name": item.name, "fullname": item.nodeid, "group": bench.group,
            "param": getattr(getattr(item, "callspec", None), "id", None),
            "params": {k: str(v) for k, v in (params or {}).items()},
            "stats": stats, "extra_info": dict(bench.extra_info)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    # one record per test: its call, or the setup/teardown phase that skipped or failed it
    if not (rep.when == "call" or (rep.when == "setup" and not rep.passed) or (rep.when == "teardown" and rep.failed)):
        return
    rec = {"type": "test", "stage": os.environ.get("FASTDDPM_STAGE"), "nodeid": item.nodeid, "when": rep.when,
           "outcome": rep.outcome, "duration_s": round(rep.duration, 4), "time": round(time.time(), 3)}
    if rep.skipped and isinstance(rep.longrepr, tuple):
        rec["reason"] = str(rep.longrepr[-1])[:300]
    elif rep.failed:
        rec["error"] = str(rep.longrepr)[-3000:]
    bench = _benchmark_record(item) if rep.when == "call" and rep.passed else None
    if bench is not None:
        rec["benchmark"] = bench
    append(rec)


def pytest_collectreport(report):
    if report.failed:
        append({"type": "collect", "stage": os.environ.get("FASTDDPM_STAGE"), "nodeid": report.nodeid,
                "outcome": "error", "error": str(report.longrepr)[-3000:], "time": round(time.time(), 3)})


def pytest_collection_modifyitems(config, items):
    done_path = os.environ.get("FASTDDPM_DONE")
    if not done_path:
        return
    done = {r["nodeid"] for r in read(done_path) if r.get("type") == "test"}
    keep = [it for it in items if it.nodeid not in done]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[it for it in items if it.nodeid in done])
        items[:] = keep


def read(path):
    """The records of a JSONL file; a torn last line (a killed writer) is skipped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def bench_json(records, device):
    """pytest-benchmark-shaped JSON (what render.py reads) from the records."""
    benches = [r["benchmark"] for r in records if r.get("type") == "test" and r.get("benchmark")]
    return {"fastddpm_device": device, "benchmarks": benches}


def summary(records):
    """{stage: {outcome: count}} of the test records, plus the stage events."""
    counts = {}
    for r in records:
        if r.get("type") == "test":
            c = counts.setdefault(r.get("stage") or "-", {})
            c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return counts


def main(argv):
    if len(argv) == 4 and argv[0] == "bench":
        records = read(argv[1])
        device = json.load(open(argv[2])) if os.path.exists(argv[2]) else {}
        data = bench_json(records, device)
        with open(argv[3], "w") as f:
            json.dump(data, f, indent=1)
        print(f"{argv[3]}: {len(data['benchmarks'])} benchmarks")
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        records = read(argv[1])
        for stage, c in summary(records).items():
            print(f"  {stage:12s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        for r in records:
            if r.get("type") == "stage":
                print(f"  stage {r['stage']}: {r['status']} after {r.get('elapsed_s', 0):.0f} s "
                      f"(cap {r.get('cap_s')} s)")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
