#!/usr/bin/env bash
# `make gpu-check`: build, check and time the CUDA path in one call, on a machine with a CUDA GPU.
# Installs nothing from the network: it uses .venv when that has CuPy, else python3 plus any wheels
# carried in .carry/wheels (a bare GPU box). Results go to $OUT when set, else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import cupy' 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .carry/wheels ]; then
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
exec "$PY" -m bench.gpu_check --out "$OUT"
