"""Start a real pd_local HTTP server (uvicorn, real engine) on a free loopback port for tests."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import httpx
import torch
import uvicorn

from pd_local.api.server import ServerSettings, create_app
from pd_local.cluster.local import LocalWorld
from pd_local.config import EngineConfig, ServeConfig, TopologyConfig
from pd_local.tokenizer import Tokenizer
from tests.dist_scripts.harness import REPO, env_for, free_port, kill_tagged, new_tag, tagged_pids


@contextmanager
def inprocess_server(model_dir: Path, engine_cfg: EngineConfig | None = None,
                     dtype: torch.dtype = torch.bfloat16, worlds: list[LocalWorld] | None = None,
                     **settings: object) -> Iterator[str]:
    """Yields the base URL of a server running in this process: the router and one colocated
    worker loop on threads (cluster/local.py), the HTTP app on a third (`worlds` gets the world)."""
    cfg = ServeConfig(model=str(model_dir), dtype=str(dtype).removeprefix("torch."),
                      topology=TopologyConfig(colocated=1), engine=engine_cfg or EngineConfig(kv_cache_gb=0.1))
    world = LocalWorld(cfg)
    if worlds is not None:
        worlds.append(world)
    if not world.router.ready.wait(timeout=120) or world.router.error is not None:
        world.shutdown()
        raise RuntimeError(f"the in-process worker did not start: {world.router.error or world.error}")
    tok = Tokenizer.from_dir(model_dir)
    app = create_app(world.router, tok, ServerSettings(**{"model_name": "smollm2-135m-instruct", **settings}))
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
        world.shutdown()  # the app's lifespan stopped the router; this waits for the worker


def wait_healthy(url: str, timeout: float = 600.0, proc: subprocess.Popen | None = None) -> None:
    """Until /health answers 200. Generous (a slow CPU loads slowly) but fails at once when
    `proc`, the server's process, has exited: a dead server is never waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was healthy")
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


@dataclass
class Served:
    url: str
    proc: subprocess.Popen  # `pd-local serve`, torchrun's supervisor, in a session of its own
    tag: str

    def rank_pid(self, rank: int) -> int:
        """The pid of rank `rank` (torchrun's child)."""
        for pid in tagged_pids(self.tag):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"pd_local.launch" in cmd:
                return pid
        raise LookupError(f"no rank {rank} among {tagged_pids(self.tag)}")

    def wait(self, timeout: float) -> tuple[int, str]:
        """torchrun's exit code and output, after at most `timeout` s (then everything dies)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tagged(self.tag)
            out, _ = self.proc.communicate()
            pytest.fail(f"server still running after {timeout} s:\n{out[-3000:]}")
        return self.proc.returncode, out

    def leftover(self) -> list[int]:
        time.sleep(0.2)  # let killed ranks finish dying
        return tagged_pids(self.tag)


@contextmanager
def serving(model_dir: Path, *flags: str) -> Iterator[Served]:
    port = free_port()
    cmd = [sys.executable, "-m", "pd_local", "serve", "--model", str(model_dir),
           "--port", str(port), "--set", "engine.max_model_len=512",
           "--set", "engine.kv_cache_gb=0.05", "--set", "timeouts.group_s=20",
           # pinned: the parity references are bf16; "auto" would differ between CPU kinds
           "--dtype", "bfloat16", *flags]
    tag = new_tag()
    # A session of its own, as a terminal would start it: a test can send its process group
    # a Ctrl-C (os.killpg) without hitting pytest.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(tag), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    served = Served(f"http://127.0.0.1:{port}", proc, tag)
    try:
        try:
            wait_healthy(served.url, proc=proc)  # /health needs no key
        except RuntimeError as e:
            kill_tagged(tag)
            out = proc.communicate()[0]
            # the first rank to fail says why; the others' tracebacks come after and fill the tail
            first = [ln for ln in out.splitlines() if "ERROR" in ln or "Error:" in ln][:8]
            pytest.fail(f"{e}; first error lines:\n" + "\n".join(first) + f"\n...\n{out[-3000:]}")
        yield served
    finally:
        kill_tagged(tag)
        proc.communicate()


