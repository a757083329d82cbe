#!/usr/bin/env bash
# One GPU, under 8 minutes (caps: 120 s + 350 s; each section saves the JSON as it ends):
# `pytest -m gpu`, then benchmarks/gpu_check.py (greedy parity on CUDA vs transformers,
# decode step time vs the HBM roofline with and without CUDA graphs, prefill TFLOP/s, the
# paged decode kernel alone, same-GPU KV transfer). Results: $OUT/gpu_check.json (+ logs), and a table.
#
# The device machine reaches no package registry: wheels it lacks (starlette, uvicorn,
# sse-starlette, prometheus_client) and SmolLM2's tokenizer files travel in the git-ignored
# .whl/ folder (README, "Checking on a GPU", says how to fill it). Extra arguments go to
# gpu_check.py (e.g. --skip parity).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log"
pytest_rc=${PIPESTATUS[0]}

timeout 350 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 \
    | tee "$OUT/gpu_check.log"
check_rc=${PIPESTATUS[0]}

echo "pytest -m gpu: rc=$pytest_rc; gpu_check.py: rc=$check_rc; $(( $(date +%s) - start )) s in all"
exit $(( pytest_rc != 0 || check_rc != 0 ))
