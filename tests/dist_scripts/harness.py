"""Launch dist_scripts/ workers from tests: under torchrun, or as bare ranks (no torchrun, so no
agent kills the survivors when one dies: what is left is the group timeouts' doing).

Every launch gets its own session (start_new_session), so a test can check that nothing of it
is left behind, and kill all of it if a run overstays its timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parents[1]


@dataclass
class Run:
    rc: int
    output: str
    seconds: float
    leftover: list[int]  # pids still alive in the run's session after it ended

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def session_pids(sid: int) -> list[int]:
    """Pids of live (non-zombie) processes in session `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _finish(proc: subprocess.Popen, t0: float, timeout: float) -> Run:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[harness] killed after {timeout} s"
    seconds = time.monotonic() - t0
    time.sleep(0.2)  # let killed children finish dying before counting them
    leftover = session_pids(proc.pid)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return Run(proc.returncode, out, seconds, leftover)


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 120.0,
             max_restarts: int = 0, env: dict[str, str] | None = None) -> Run:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           str(SCRIPTS / script), *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return _finish(proc, t0, timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(script: str, world_size: int, args: list[str],
                env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `world_size` bare ranks of `script` (rank 0 hosts the TCPStore), each in a session
    of its own."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(world_size):
        rank_env = _env({"RANK": str(rank), "LOCAL_RANK": str(rank),
                         "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port), **(env or {})})
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPTS / script), *args], cwd=REPO, env=rank_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True))
    return procs
