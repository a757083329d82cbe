"""Start a real pd_local HTTP server (uvicorn, real engine) on a free loopback port for tests."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import torch
import uvicorn

from pd_local.backend import InProcessBackend
from pd_local.engine import Engine, EngineConfig
from pd_local.model.weights import load_model
from pd_local.server import ServerSettings, create_app
from pd_local.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def inprocess_server(model_dir: Path, engine_cfg: EngineConfig | None = None, **settings: object) -> Iterator[str]:
    """Yields the base URL of a server running in a thread of this process."""
    model, _ = load_model(model_dir, torch.bfloat16)
    tok = Tokenizer.from_dir(model_dir)
    engine = Engine(model, engine_cfg or EngineConfig(kv_cache_gb=0.1), stop_token_ids=tok.stop_token_ids)
    app = create_app(InProcessBackend(engine), tok, ServerSettings(**{"model_name": "smollm2", **settings}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy in {timeout} s")


def metric_values(url: str, name: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """{label-string: value} of one metric family from /metrics."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, val = line.rpartition(" ")
            out[key[len(name):]] = float(val)
    return out
