"""benchmarks/run_gpu.sh and its JSONL recorder, on the CPU: the same stages run
(the CUDA tests and benchmarks skip), the files appear under $OUT, a stage
killed at its cap is recorded and named for the rerun, and every finished test
is on disk the moment it finishes."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_gpu.sh")


def _records(path):
    return [json.loads(line) for line in open(path)]


def _env(**extra):
    env = dict(os.environ)
    env.update({"PYTHON": sys.executable, "PYTHONPATH": ROOT, **extra})
    return env


_BENCH_FILE = '''
import pytest

def test_timed(benchmark):
    benchmark.group = "toy group"
    benchmark.extra_info.update(provider="reference", gpu_median_us=12.5)
    benchmark.pedantic(lambda: sum(range(100)), rounds=3, iterations=1)

def test_skipped():
    pytest.skip("no device here")

def test_failed():
    assert 1 == 2, "planted failure"
'''


def test_jsonl_plugin_records_each_test_as_it_finishes(tmp_path):
    (tmp_path / "test_toy.py").write_text(_BENCH_FILE)
    jsonl = tmp_path / "out" / "results.jsonl"
    jsonl.parent.mkdir()
    env = _env(FASTDDPM_JSONL=str(jsonl), FASTDDPM_STAGE="toy",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'benchmarks')}")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "jsonl_log", "-p", "no:cacheprovider",
                        str(tmp_path / "test_toy.py")], env=env, capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]   # the planted failure
    recs = {rec["nodeid"].split("::")[-1]: rec for rec in _records(jsonl)}
    assert {k: v["outcome"] for k, v in recs.items()} == {"test_timed": "passed", "test_skipped": "skipped",
                                                          "test_failed": "failed"}
    assert all(v["stage"] == "toy" for v in recs.values())
    assert "no device here" in recs["test_skipped"]["reason"]
    assert "planted failure" in recs["test_failed"]["error"]
    bench = recs["test_timed"]["benchmark"]
    assert bench["group"] == "toy group" and bench["stats"]["rounds"] == 3 and bench["stats"]["median"] > 0
    assert bench["extra_info"]["gpu_median_us"] == 12.5
    # a torn last line (a writer killed mid-line) is skipped; the rest renders
    with open(jsonl, "a") as f:
        f.write('{"type": "test", "nodeid": "cut')
    dev = tmp_path / "out" / "device.json"
    dev.write_text(json.dumps({"device": "Toy GPU", "date": "2026-12-01T00:00:00+00:00"}))
    named = tmp_path / "out" / "toy-gpu-2026-12-01.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "jsonl_log.py"), "bench", str(jsonl), str(dev),
                    str(named)], check=True, capture_output=True, timeout=60)
    md = tmp_path / "out" / "BENCHMARKS.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "render.py"), "--results", str(named.parent),
                    "--out", str(md)], check=True, capture_output=True, timeout=60)
    text = md.read_text()
    assert "## Toy GPU — 2026-12-01" in text and "### toy group" in text and "| reference | 12.5 |" in text


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_dry_run_stages_files_and_rerun_line(tmp_path):
    """setup and model run to the end; ablations is killed at a 1 s cap: recorded
    as a timeout and named in the rerun line. At most 8 files under $OUT; the
    dispatch stage writes its report."""
    out = tmp_path / "out"
    # setup, dispatch and model take ~30 s together on an idle 2-core machine; their caps
    # here are generous so that a loaded machine cannot turn them into timeouts
    r = subprocess.run(["bash", SCRIPT], env=_env(OUT=str(out), DRY_RUN="1", STAGES="setup dispatch model ablations",
                                                  CAP_SETUP="200", CAP_DISPATCH="240", CAP_MODEL="240",
                                                  CAP_ABLATIONS="1", BUDGET_S="800"),
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    for name in ("device.json", "results.jsonl", "run.log", "summary.txt", "BENCHMARKS.md", "dispatch.txt"):
        assert name in files, files
    recs = _records(out / "results.jsonl")
    stages = {rec["stage"]: rec["status"] for rec in recs if rec["type"] == "stage"}
    assert stages == {"setup": "ok", "dispatch": "ok", "model": "ok", "ablations": "timeout"}, stages
    # the dispatch stage's train and sample runs: their keys, each with its backend and reason
    report = (out / "dispatch.txt").read_text().splitlines()
    assert report[0].startswith("fastddpm dispatch: FASTDDPM_BACKEND=auto, FASTDDPM_DISPATCH=verify")
    assert any(" sample_step " in ln for ln in report) and any(" group_norm " in ln for ln in report), report
    rows = [[f.strip() for f in ln.split("|")] for ln in report[1:]]
    # the ResBlocks' dropout (the key's last argument nonzero): checked against the C++ mask's replay
    assert any(r[1] == "cpp" and r[2].startswith("group_norm cpp fwd+bwd") and r[2].endswith("; f")
               and r[3].startswith("verified") for r in rows), report
    model_tests = [rec for rec in recs if rec["type"] == "test" and rec["stage"] == "model"]
    assert model_tests and all(rec["nodeid"].startswith(("benchmarks/test_model.py", "benchmarks/test_sampling.py"))
                               for rec in model_tests)
    assert any(rec["nodeid"].startswith("benchmarks/test_sampling.py") for rec in model_tests)  # the sampler loop
    assert not any("default" in rec["nodeid"] or "reduce-overhead" in rec["nodeid"] for rec in model_tests), \
        "torch.compile variants belong to the compile stage"
    summary = (out / "summary.txt").read_text()
    assert 'left: STAGES="setup ablations" BUDGET_S=540 bash benchmarks/run_gpu.sh' in summary, summary
    assert any(f.endswith(".json") and f != "device.json" for f in files)   # the benchmark JSON for render.py

    # rerun with the first run's records: its finished tests are carried over, not run again
    out2 = tmp_path / "out2"
    r = subprocess.run(["bash", SCRIPT], env=_env(OUT=str(out2), DRY_RUN="1", STAGES="model", BUDGET_S="300",
                                                  PREVIOUS=str(out / "results.jsonl")),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs2 = [rec for rec in _records(out2 / "results.jsonl") if rec["type"] == "test"]
    assert sorted(rec["nodeid"] for rec in recs2) == sorted(rec["nodeid"] for rec in recs if rec["type"] == "test")
    assert "deselected" in (out2 / "run.log").read_text()


def test_unknown_stage_is_refused(tmp_path):
    r = subprocess.run(["bash", SCRIPT], env=_env(OUT=str(tmp_path), STAGES="setup benchmarks"),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "unknown stage 'benchmarks'" in r.stderr


def test_rest_stage_runs_gpu_files_before_the_cpu_benchmarks(tmp_path):
    """The CPU-only benchmarks (minutes, a torch.compile inside) go last in stage
    rest, so that its cap cannot starve a GPU file such as test_inception.py; the
    sampler-accuracy benchmark (CPU minutes, device-independent) is not run there."""
    args_log = tmp_path / "pytest_args.txt"
    stub = tmp_path / "py"
    stub.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m pytest" ]; then echo "$@" >>"{args_log}"; exit 0; fi\n'
                    f'exec "{sys.executable}" "$@"\n')
    stub.chmod(0o755)
    r = subprocess.run(["bash", SCRIPT], env=_env(OUT=str(tmp_path / "out"), DRY_RUN="1", STAGES="rest",
                                                  PYTHON=str(stub), BUDGET_S="120"),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = [a for a in args_log.read_text().split() if a.startswith("benchmarks/test_")]
    assert files[-1] == "benchmarks/test_cpu.py" and "benchmarks/test_inception.py" in files, files
    assert files.count("benchmarks/test_cpu.py") == 1, files
    assert "benchmarks/test_sampler_accuracy.py" not in files, files    # CPU minutes, device-independent
