#!/usr/bin/env bash
# Create a CPU venv with SGLang 0.5.23 and this repo installed editable.
#
#   bash scripts/setup-sglang.sh VENV_DIR
#
# PyPI has no CPU build of SGLang's stack: a plain `pip install sglang` pulls CUDA torch and
# ~30 nvidia wheels. So torch is pinned by a constraints file, sglang goes in without its
# dependencies, and torchvision (CUDA-linked on the registry) is patched so it imports on CPU
# torch. The sgl_kernel stand-in is not installed: tests put tests/sglang/cpu on PYTHONPATH.
set -euo pipefail

VENV=${1:?usage: setup-sglang.sh VENV_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}

"$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
PIP="$VENV/bin/pip"
CONSTRAINTS="$VENV/constraints.txt"
# Without these pins torchvision/sglang's resolver silently swaps torch for a CUDA build.
printf 'torch==2.13.0\ntriton==3.7.1\n' > "$CONSTRAINTS"

"$PIP" install -q --upgrade pip
"$PIP" install -q torch==2.13.0 triton==3.7.1
"$PIP" install -q --no-deps sglang==0.5.23 torchvision==0.28.0 compressed-tensors==0.18.0
# jsonschema, soundfile, python-multipart: the HTTP server (launch_server) imports them; the engine doc's list stops at Engine.
"$PIP" install -q -c "$CONSTRAINTS" numpy transformers==5.19.0 psutil pyzmq requests tqdm \
    pydantic orjson msgspec setproctitle pybase64 einops packaging xxhash pillow starlette IPython \
    aiohttp apache-tvm-ffi dill sentencepiece==0.2.1 loguru gguf openai==2.8.0 partial_json_parser \
    uvloop uvicorn fastapi xgrammar==0.2.7 jsonschema soundfile python-multipart

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" "$ROOT/tests/sglang/cpu/patch_torchvision.py" "$SITE"

# Editable, so the `dmi` and `sglang.srt.plugins` entry points register; -c keeps torch.
"$PIP" install -q -c "$CONSTRAINTS" -e "$ROOT[test]"

"$VENV/bin/python" - <<'EOF'
import torch, sglang
assert "+cpu" in torch.__version__ or not torch.version.cuda, torch.__version__
print("torch", torch.__version__, "sglang", sglang.__version__)
EOF
echo "ready: run tests with  $VENV/bin/python -m pytest tests/sglang -m sglang"
