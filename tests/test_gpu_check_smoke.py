"""benchmarks/gpu_check.py runs on CPU at tiny sizes (--device cpu --smoke), every section.

The GPU check runs only when a session is lent a device (15 minutes, all calls together), so a
section that breaks there for a reason a CPU shows too (a wrong call, a missing name) costs that
rare run. This runs each section's code here: its figures mean nothing, its errors do. What it
cannot reach on CPU: CUDA IPC, CUDA graphs' capture, the compiled Triton kernel (the interpreter
runs it instead) and the one-GPU share_device flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="gpu_check's parity reference is transformers")

ROOT = Path(__file__).resolve().parent.parent


def test_every_section_runs_on_cpu(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
         "--tokenizer", str(smollm2_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = res["sections"]
    assert set(sections) == {"bandwidth", "decode", "prefill", "decode_attention", "kv_transfer",
                             "parity"}
    errors = {k: v["error"] for k, v in sections.items() if "error" in v}
    assert not errors, errors

    dec = sections["decode"]["result"]["rows"]
    assert [(r["batch"], r["cuda_graphs"]) for r in dec] == [(1, False), (1, True), (4, False), (4, True)]
    assert all(r["step_ms"] > 0 and r["roofline_ms"] > 0 for r in dec)

    att = sections["decode_attention"]["result"]["rows"]
    assert att and all("triton_error" not in r and "torch_gather_error" not in r for r in att), att
    assert all(r["max_abs_diff"] < 1e-4 for r in att), att  # fp32: the two paths agree

    kv = sections["kv_transfer"]["result"]
    assert kv["host_gloo_gbps"] > 0 and "ipc_gbps" not in kv  # no CUDA: IPC is not run

    par = sections["parity"]["result"]
    fp32 = par["float32"]
    for where in ("engine_colocated_inprocess", "served_colocated_1", "served_1p1d_one_gpu"):
        assert "error" not in fp32[where], fp32[where]
        assert fp32[where]["identical"], (where, fp32[where])  # fp32 on CPU: identical tokens
    assert "agree_prefix_tokens" in par["bfloat16"]["engine_colocated_inprocess"]
    assert "paged decode attention" in proc.stdout and "gpu_check summary" in proc.stdout
