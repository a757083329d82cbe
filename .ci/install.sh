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
# The web page's tests drive a real Chromium (tests/test_web_page.py); without one they skip.
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        echo "[install] chromium (apt) for the web page's browser tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
            || echo "[install] apt could not install chromium: the browser tests will skip"
    else
        echo "[install] no chromium and no root apt-get: the browser tests will skip (install chromium to run them)"
    fi
fi
