#!/usr/bin/env bash
# Installs pd_local (and, with --test, its test extra) into the current Python.
# torch first: on a machine without torch and without an NVIDIA GPU, pin the local CPU build
# (torch==2.13.0) so pip does not pull several GB of CUDA wheels; an existing torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "[install] no torch, NVIDIA GPU present: installing the registry's CUDA torch"
        "$PY" -m pip install "torch>=2.4"
    else
        echo "[install] no torch, no GPU: installing the CPU build torch==2.13.0"
        "$PY" -m pip install "torch==2.13.0"
    fi
else
    echo "[install] torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: left alone"
fi
extra=""
if [[ "${1:-}" == "--test" ]]; then extra="[test]"; fi
"$PY" -m pip install -e ".${extra}"
