#!/usr/bin/env bash
# The GPU check in one command, one report (scripts/gpu_check.py says what it checks).
# Needs: a CUDA GPU, torch, triton, transformers, h5py, pluggy; no internet. dmi's other
# dependencies (pydantic, pyyaml) travel with it when missing: put their wheels in .whl/.
#   bash scripts/gpu-check.sh [REPORT.md]        (default: gpu-check.md; exits 1 if a check failed)
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu-check.md}"
py="${PYTHON:-python3}"
if ! "$py" -c "import pydantic, yaml" 2>/dev/null; then
  [ -d .whl ] && "$py" -m pip install -q --no-index --find-links .whl pydantic pyyaml >/dev/null 2>&1
fi
export PYTHONPATH="$PWD/.gl${PYTHONPATH:+:$PYTHONPATH}"
# dmi is imported from this checkout without installing it (package-dir mapping, see .gl).
mkdir -p .gl && "$py" scripts/gpu_check.py --link .gl >/dev/null
exec timeout 470 "$py" scripts/gpu_check.py --report "$report"
