#!/usr/bin/env bash
# Installs fastddpm and what it needs. Keeps an installed CUDA torch >= 2.11 and
# triton >= 3.6 (GPU machines); otherwise installs the pinned CPU stack.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
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
"$PY" -c "import fastddpm, fastddpm.ops as o; print('fastddpm installed; backends on cpu:', o.available_backends('cpu'))" >&2
