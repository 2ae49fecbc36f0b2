#!/usr/bin/env bash
# The first GPU run as one command that fits a 9-minute device call:
#
#   bash benchmarks/run_gpu.sh                                  every stage, within BUDGET_S (520 s)
#   STAGES="model ablations" BUDGET_S=540 bash benchmarks/run_gpu.sh   rerun what is left
#   DRY_RUN=1 bash benchmarks/run_gpu.sh       no build step; on a CPU the CUDA tests and
#                                             benchmarks skip, so it shows the stages and files
#   PREVIOUS=path/results.jsonl ...           an earlier run's records: its finished tests are
#                                             not run again, and its records carry over
#
# Stages, in this order; each runs under `timeout` with its cap (seconds; CAP_<STAGE>=N
# overrides), cut to the budget left; with under 15 s of the budget left a stage is skipped:
#   setup        C++ extension built in place, imports checked (every run first writes
#                device.json and makes fastddpm.kernels importable)                       (100)
#   dispatch     the dispatch's first-use checks (fastddpm/ops/_backend.py) at the paper
#                net's keys: 2 training steps (bf16, dropout, batch 32) and a 5-step sample through
#                the CLIs on the GPU; writes dispatch.txt                                 (120)
#   correctness  pytest tests -m gpu, not the torch.compile ones, in PROCS (4) processes
#                at once so that Triton compiles and autotuning overlap                    (170)
#   kernels      kernel-target benchmarks: test_kernels.py, test_attention.py, eager        (100)
#   model        whole model, reference vs fused, eager: test_model.py, test_sampling.py
#                (with 10-step images/s of every sampler at batch 256 / 1024, graphed)    (90)
#   ablations    fusion ablations (-k resblock_tail / projection / ablation)                (50)
#   rest         every other benchmark file (new ones), eager; the CPU-only test_cpu.py last;
#                not test_sampler_accuracy.py (CPU only, device-independent)                (40)
#   compile      torch.compile variants only: benchmarks -m compile (the marker
#                benchmarks/conftest.py gives compiled providers), GPU tests -k compile     (rest)
# Autotune results are cached on disk (cache_results), so a later benchmark stage
# reuses what an earlier one tuned (the test processes, which tune side by side on
# one GPU, keep a cache of their own).
#
# Under $OUT (default benchmarks/results/latest), 7 files and a folder, each rewritten as the run goes:
#   device.json             GPU, driver, torch/triton/CUDA versions, date, git commit
#   results.jsonl           one line per finished test or benchmark (benchmarks/jsonl_log.py),
#                           appended the moment it finishes, plus one line per stage
#   run.log                 every stage's pytest output
#   <device>-<date>.json    the benchmarks so far as pytest-benchmark JSON with device.json
#                           merged in: copy it to benchmarks/results/, run benchmarks/render.py
#   BENCHMARKS.md           a preview rendered from that file alone
#   summary.txt             per stage: outcome counts, status; the command that reruns what is left
#   dispatch.txt            fastddpm.ops.dispatch_report(): per key the backend auto runs and why
#                           (verified and faster, slower by x, mismatch e, error ...), from
#   dispatch-cache/         the decisions (FASTDDPM_CACHE_DIR) of this run's model stages and benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}        # the GPU image's torch lives in python3
BUDGET_S=${BUDGET_S:-520}
PROCS=${PROCS:-4}
DRY_RUN=${DRY_RUN:-0}
read -r -a STAGES <<< "${STAGES:-setup dispatch correctness kernels model ablations rest compile}"
JSONL=$OUT/results.jsonl
LOG=$OUT/run.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/run_gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
RESERVE=10                   # seconds kept for the final merge and summary
# Tests run in parallel processes that share the GPU, so their autotuning times
# are contended: they get a Triton cache of their own, and the benchmarks (one
# process at a time) never reuse a config that such a run picked.
TESTS_CACHE=$WORK/triton-cache-tests
LEFT=()                      # stages that did not finish (timed out or skipped)
status=0
export FASTDDPM_JSONL=$JSONL PYTHONUNBUFFERED=1
# the dispatch's decisions of this run (the tests keep their own: tests/conftest.py)
export FASTDDPM_CACHE_DIR=$OUT/dispatch-cache
if [ -n "${PREVIOUS:-}" ]; then
  [ -f "$PREVIOUS" ] || { echo "run_gpu.sh: PREVIOUS=$PREVIOUS is not a file" >&2; exit 2; }
  grep -h '"type": "test"' "$PREVIOUS" >"$WORK/done.jsonl" || true
  if [ "$(cd "$(dirname "$PREVIOUS")" && pwd)/$(basename "$PREVIOUS")" != "$JSONL" ]; then
    cp "$WORK/done.jsonl" "$JSONL"
  fi
  export FASTDDPM_DONE=$WORK/done.jsonl
else
  : >"$JSONL"
fi
: >"$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}:$ROOT/benchmarks"   # benchmarks/: the jsonl_log plugin

cap_of() {  # default cap of a stage, or CAP_<STAGE>
  local var="CAP_${1^^}" def
  case $1 in setup) def=100 ;; dispatch) def=120 ;; correctness) def=170 ;; kernels) def=100 ;; model) def=90 ;;
             ablations) def=50 ;; rest) def=40 ;; *) def=$BUDGET_S ;; esac
  echo "${!var:-$def}"
}
elapsed() { echo $(( $(date +%s) - START )); }
existing() { local f; for f in "$@"; do [ -f "$f" ] && echo "$f"; done; }

# pytest with the JSONL plugin, under a cap; output to a log of its own (appended to run.log)
pt() {
  local cap=$1 log=$2; shift 2
  timeout -k 10 "$cap" "$PY" -m pytest -p jsonl_log -p no:cacheprovider -q -rfE "$@" >"$log" 2>&1
  local rc=$?
  [ $rc -eq 5 ] && rc=0      # nothing selected
  return $rc
}

merge() {  # results so far -> <device>-<date>.json + BENCHMARKS.md (cheap; after every stage)
  local name
  name=$("$PY" - "$OUT" <<'PYEOF'
import json, os, re, sys
out = sys.argv[1]
dev = json.load(open(f"{out}/device.json")) if os.path.exists(f"{out}/device.json") else {}
slug = re.sub(r"[^a-z0-9]+", "-", (dev.get("device") or "device").lower()).strip("-")
print(f"{out}/{slug}-{(dev.get('date') or 'undated')[:10]}.json")
PYEOF
)
  "$PY" benchmarks/jsonl_log.py bench "$JSONL" "$OUT/device.json" "$name" >/dev/null \
    && "$PY" benchmarks/render.py --results "$OUT" --out "$OUT/BENCHMARKS.md" >/dev/null
}

stage_setup() {
  local cap=$1
  if [ "$DRY_RUN" != 1 ]; then
    timeout -k 5 $(( cap - 20 > 10 ? cap - 20 : 10 )) "$PY" setup.py -q build_ext --inplace \
      || echo "run_gpu.sh: C++ extension not built; the cpp backend is off, Triton runs" >&2
  fi
  "$PY" -c "import pytest_benchmark" 2>/dev/null || { [ -d .whl ] && "$PY" -m pip install -q --no-index \
      --find-links .whl pytest-benchmark; } || echo "run_gpu.sh: pytest-benchmark is missing" >&2
  "$PY" -c "import fastddpm.ops as o; print('backends on cuda:', o.available_backends('cuda'))"
}

write_dispatch() {  # dispatch.txt from the decisions so far
  "$PY" -c "import fastddpm.ops as o; print(o.dispatch_report())" >"$OUT/dispatch.txt" 2>&1
}

stage_dispatch() {  # train 2 steps and sample 5 through the CLIs: every model op's first use, checked
  local cap=$1 d=$WORK/dispatch rc net
  if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    net="--image-size 32 --ch 128 --ch-mult 1,2,2,2 --num-res-blocks 2 --attn-resolutions 16 --num-groups 32
         --dropout 0.1 --batch-size 32 --precision bf16 --device cuda"
  else  # DRY_RUN on a CPU: the same path on a tiny net
    net="--image-size 8 --ch 16 --ch-mult 1 --attn-resolutions 8 --num-groups 4 --dropout 0.1 --batch-size 8
         --device cpu"
  fi
  # shellcheck disable=SC2086
  timeout -k 5 $(( cap * 3 / 4 )) "$PY" -m fastddpm.train --preset tiny $net --steps 2 --warmup 1 --workers 0 \
      --sample-n 0 --log-every 1 --no-progress --out "$d" >>"$LOG" 2>&1 \
    && timeout -k 5 $(( cap / 4 )) "$PY" -m fastddpm.sample --checkpoint "$d" --n 4 --sampler ddim --steps 5 \
      --no-progress --out "$d/samples" >>"$LOG" 2>&1
  rc=$?
  write_dispatch
  cat "$OUT/dispatch.txt" >>"$LOG"
  return $rc
}

stage_correctness() {  # GPU tests by file, dealt over PROCS processes (largest files first)
  local cap=$1 i pids=() rc=0
  mapfile -t files < <(grep -c "mark.gpu" tests/test_*.py | awk -F: '$2 > 0 {print $2, $1}' | sort -rn | cut -d' ' -f2)
  [ ${#files[@]} -eq 0 ] && return 0
  local -a buckets
  for i in "${!files[@]}"; do buckets[$(( i % PROCS ))]+=" ${files[$i]}"; done
  for i in "${!buckets[@]}"; do
    # shellcheck disable=SC2086
    TRITON_CACHE_DIR=$TESTS_CACHE pt "$cap" "$WORK/correctness.$i.log" ${buckets[$i]} -m gpu -k "not compile" &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || rc=$?; cat "$WORK/correctness.$i.log" >>"$LOG"; done
  return $rc
}

KERNEL_FILES=(benchmarks/test_kernels.py benchmarks/test_attention.py)
MODEL_FILES=(benchmarks/test_model.py benchmarks/test_sampling.py)
ABLATIONS="resblock_tail or projection or ablation"

bench_stage() {  # cap, name, pytest args...
  local cap=$1 name=$2 rc; shift 2
  pt "$cap" "$WORK/$name.log" --benchmark-only --benchmark-columns=median,iqr,rounds "$@"; rc=$?
  cat "$WORK/$name.log" >>"$LOG"
  return $rc
}
stage_kernels() { bench_stage "$1" kernels $(existing "${KERNEL_FILES[@]}") -m "not compile" -k "not ($ABLATIONS)"; }
stage_model() { bench_stage "$1" model $(existing "${MODEL_FILES[@]}") -m "not compile"; }
stage_ablations() { bench_stage "$1" ablations $(existing "${KERNEL_FILES[@]}") -m "not compile" -k "$ABLATIONS"; }
CPU_FILES=(benchmarks/test_cpu.py)   # CPU-only (and a torch.compile inside): last, so they never starve GPU files
# Not run here at all: CPU minutes whose numbers do not depend on the device.
NOT_ON_GPU=(benchmarks/test_sampler_accuracy.py)
stage_rest() {
  local f files=()
  for f in benchmarks/test_*.py; do
    [[ " ${KERNEL_FILES[*]} ${MODEL_FILES[*]} ${CPU_FILES[*]} ${NOT_ON_GPU[*]} " == *" $f "* ]] || files+=("$f")
  done
  mapfile -t -O ${#files[@]} files < <(existing "${CPU_FILES[@]}")
  [ ${#files[@]} -eq 0 ] && return 0
  bench_stage "$1" rest "${files[@]}" -m "not compile"
}
stage_compile() {  # compiled benchmarks and the GPU torch.compile tests, side by side
  local cap=$1 rc=0 p1 p2
  pt "$cap" "$WORK/compile.0.log" benchmarks/ --benchmark-only -m compile & p1=$!
  TRITON_CACHE_DIR=$TESTS_CACHE pt "$cap" "$WORK/compile.1.log" tests/ -m gpu -k compile & p2=$!
  wait $p1 || rc=$?; wait $p2 || rc=$?
  cat "$WORK/compile.0.log" "$WORK/compile.1.log" >>"$LOG"
  return $rc
}

record_stage() {  # name status rc cap elapsed
  printf '{"type": "stage", "stage": "%s", "status": "%s", "rc": %d, "cap_s": %d, "elapsed_s": %d, "time": %d}\n' \
    "$1" "$2" "$3" "$4" "$5" "$(date +%s)" >>"$JSONL"
}

device_info() {  # device.json: written first by every run, reruns too
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
}

for st in "${STAGES[@]}"; do
  if ! declare -F "stage_$st" >/dev/null; then
    echo "run_gpu.sh: unknown stage '$st' (setup dispatch correctness kernels model ablations rest compile)" >&2
    exit 2
  fi
done

# fastddpm.kernels is the top-level kernels/ (setup.py's package_dir); a checkout
# without an install (a fresh device machine, any stage) reaches it through a link
[ -e fastddpm/kernels ] || ln -s ../kernels fastddpm/kernels
device_info >>"$LOG" 2>&1 || { echo "run_gpu.sh: torch is not importable (see $LOG)" >&2; exit 2; }

for st in "${STAGES[@]}"; do
  left=$(( BUDGET_S - $(elapsed) - RESERVE ))
  cap=$(cap_of "$st")
  (( cap > left )) && cap=$left
  if (( left < 15 )); then
    echo "== $st: skipped, $left s of the budget left" | tee -a "$LOG" >&2
    record_stage "$st" skipped 0 "$cap" 0
    LEFT+=("$st")
    continue
  fi
  echo "== $st (cap ${cap} s, at $(elapsed) s)" | tee -a "$LOG" >&2
  t0=$(date +%s)
  if [ "$st" = setup ]; then
    FASTDDPM_STAGE=$st stage_setup "$cap" >>"$LOG" 2>&1; rc=$?
  else
    FASTDDPM_STAGE=$st "stage_$st" "$cap"; rc=$?
  fi
  dt=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then s=timeout; LEFT+=("$st")
  elif (( rc == 0 )); then s=ok
  else s=failed; status=1
  fi
  record_stage "$st" "$s" "$rc" "$cap" "$dt"
  echo "== $st: $s after ${dt} s" | tee -a "$LOG" >&2
  merge
done

write_dispatch   # with the benchmarks' decisions too
{
  echo "run_gpu.sh: ${STAGES[*]} in $(elapsed) s of BUDGET_S=$BUDGET_S (DRY_RUN=$DRY_RUN)"
  "$PY" benchmarks/jsonl_log.py summary "$JSONL"
  if [ ${#LEFT[@]} -gt 0 ]; then
    # a fresh machine needs setup again (the C++ extension build)
    [[ " ${LEFT[*]} " == *" setup "* ]] || LEFT=(setup "${LEFT[@]}")
    echo "left: STAGES=\"${LEFT[*]}\" BUDGET_S=540 bash benchmarks/run_gpu.sh"
  else
    echo "left: nothing"
  fi
} | tee "$OUT/summary.txt"
exit $status
