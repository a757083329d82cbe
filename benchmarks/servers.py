"""Start and stop a `pd-local serve` world for a benchmark: one helper for every script here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(name: str, flags: list[str], log_path: Path, timeout_s: float = 240.0
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """`pd-local serve --port P FLAGS` in its own process group, output to log_path; returns
    (process, base URL) once /health answers 200. Raises with the log's path if it dies first."""
    port = free_port()
    cmd = [sys.executable, "-m", "pd_local", "serve", "--port", str(port), *flags]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    return proc, wait_healthy(proc, f"http://127.0.0.1:{port}", name, log_path, timeout_s)


def wait_healthy(proc: subprocess.Popen[bytes], url: str, name: str, log_path: Path,
                 timeout_s: float) -> str:
    """`url` once its /health answers 200; raises with the log's path if `proc` dies first or
    the time runs out (stopping it then)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"{name} did not become healthy in {timeout_s:.0f} s; see {log_path}")


def bench_completions(url: str, concurrency: int, n: int, out: Path) -> dict:
    """`pd-local bench` on url's /v1/completions: n requests of 128 prompt and 128 output tokens
    (ignore_eos), `concurrency` in flight; medians from its result file."""
    cmd = [sys.executable, "-m", "pd_local", "bench", "--base-url", url, "--endpoint",
           "/v1/completions", "--input-len", "128", "--output-len", "128", "--ignore-eos",
           "--num-prompts", str(n), "--max-concurrency", str(concurrency), "--warmup", "2",
           "--quiet", "--result-file", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    r = json.loads(out.read_text())
    return {"out_tok_s": round(r["output_throughput"], 1), "ttft_ms": round(r["median_ttft_ms"], 1),
            "itl_ms": round(r["median_itl_ms"], 1), "completed": r["completed"],
            "failed": r.get("failed", 0)}


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (torchrun and its ranks), SIGKILL after 60 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
