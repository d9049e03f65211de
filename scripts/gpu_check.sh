#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): run on a machine with a CUDA device, from the
# repository root, in under five minutes. Installs conceptmon into .venv-gpu when it is not
# importable yet, then prints the JSON result; exit status 1 when the check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import conceptmon, torch" 2>/dev/null; then
  "$PY" -m venv .venv-gpu
  PY=.venv-gpu/bin/python
  "$PY" -m pip install -q -e .
fi
exec "$PY" scripts/gpu_check.py "$@"
