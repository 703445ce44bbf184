#!/usr/bin/env bash
# `make gpu-check`: build, check and time the CUDA path in one call, on a machine with a CUDA GPU: GPU tests,
# kernel throughput (single messages and batches, against a device-to-device copy), the bench harness end to
# end with the CUDA endpoint, the demo; under 5 minutes (bench/gpu_check.py keeps the budget).
# Installs nothing from the network: it uses .venv when that has CuPy, else python3 plus any wheels
# carried in .carry/wheels (a bare GPU box). Results go to $OUT when set, else bench/results/.
# `bash scripts/gpu-check.sh --dry-run` runs every step against the fake GPU of tests/gpu (no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && { [ "$DRY" = 1 ] || .venv/bin/python -c 'import cupy' 2>/dev/null; }; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
if [ -d .carry/wheels ] && [ "$DRY" = 0 ]; then
  "$PY" -m pip install -q --no-index --find-links .carry/wheels --target .carry/site \
    $(cat .carry/wheels/requirements.txt) 2>&1 | tail -3
  export PYTHONPATH="$PWD/.carry/site:$PWD/client:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/client:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ! -d client/pipellm_client/_gen ]; then
  echo "gpu-check: generated protobuf code missing; run 'make proto' first (or carry client/pipellm_client/_gen)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check --out "$OUT" "$@"
