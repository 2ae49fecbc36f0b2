#!/usr/bin/env bash
# One script for the GPU machine: build, GPU tests, all benchmarks, device info.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh [build] [tests] [bench]   (default: all three)
#   BENCH_K="not test_model" ... bench    only the benchmarks pytest -k selects (to fit a
#                                          10-minute call: kernels first, then -k test_model)
#
# Writes under $OUT (default benchmarks/results/latest):
#   device.json               GPU, driver, torch/triton/CUDA versions, date, git commit
#   gpu_tests.txt             output of `pytest tests -m gpu`
#   bench.json                pytest-benchmark JSON of `pytest benchmarks/ --benchmark-only`
#   <device>-<date>[-<k>].json  bench.json with device.json merged in (<k>: BENCH_K, slugged): copy it to
#                             benchmarks/results/ and run `python benchmarks/render.py`
#   BENCHMARKS.md             a preview rendered from that file alone
# Never reinstalls torch: the package goes in with --no-deps. The GPU machine may
# have no network: pytest-benchmark then comes from wheels in ./.whl if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the GPU image's torch lives in python3
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests bench)
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
status=0

"$PY" - "$OUT/device.json" <<'PYEOF'
import datetime, json, platform, subprocess, sys
import torch
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, sm=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count)
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=20).stdout.strip()
except Exception as e:  # no nvidia-smi
    info["driver"] = f"unknown ({type(e).__name__})"
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    info["commit"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
PYEOF
[ $? -eq 0 ] || { echo "run_gpu.sh: torch is not importable" >&2; exit 2; }

if want build; then
  echo "== build" >&2
  "$PY" -m pip install -q -e . --no-build-isolation --no-deps || { echo "run_gpu.sh: build failed" >&2; status=1; }
  for mod in numpy tqdm PIL; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links .whl "$([ $mod = PIL ] && echo pillow || echo $mod)" \
      || "$PY" -m pip install -q "$([ $mod = PIL ] && echo pillow || echo $mod)" || echo "run_gpu.sh: $mod missing" >&2
  done
  if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    { [ -d .whl ] && "$PY" -m pip install -q --no-index --find-links .whl pytest-benchmark; } \
      || "$PY" -m pip install -q pytest-benchmark || echo "run_gpu.sh: pytest-benchmark is missing" >&2
  fi
  "$PY" -c "import fastddpm.ops as o; print('backends on cuda:', o.available_backends('cuda'))" >&2
fi

if want tests; then
  echo "== pytest tests -m gpu" >&2
  "$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want bench; then
  echo "== pytest benchmarks/ --benchmark-only" >&2
  "$PY" -m pytest benchmarks/ --benchmark-only --benchmark-json="$OUT/bench.json" ${BENCH_K:+-k "$BENCH_K"} \
      --benchmark-columns=median,iqr,rounds -q -p no:cacheprovider 2>&1 | tee "$OUT/bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  if [ -f "$OUT/bench.json" ]; then
    "$PY" - "$OUT" "${BENCH_K:-}" <<'PYEOF'
import json, re, sys
out, k = sys.argv[1], sys.argv[2]
bench = json.load(open(f"{out}/bench.json"))
dev = json.load(open(f"{out}/device.json"))
bench["fastddpm_device"] = dev
slug = re.sub(r"[^a-z0-9]+", "-", (dev.get("device") or "device").lower()).strip("-")
tag = "-" + re.sub(r"[^a-z0-9]+", "-", k.lower()).strip("-") if k else ""
bench["fastddpm_device"]["selection"] = k or "all"
name = f"{out}/{slug}-{dev['date'][:10]}{tag}.json"
json.dump(bench, open(name, "w"), indent=1)
print(name)
PYEOF
    "$PY" benchmarks/render.py --results "$OUT" --out "$OUT/BENCHMARKS.md" || status=1
  fi
fi
exit $status
