"""Launch dist_scripts/ workers from tests: under torchrun, or as bare ranks (no torchrun, so no
agent kills the survivors when one dies: what is left is the group timeouts' doing).

Every launch is tagged: a unique PD_LOCAL_TEST_TAG in the environment, which every descendant
inherits (torchrun puts each worker in a session of its own, and orphans change parent, so
neither sessions nor the process tree find them all). A test checks with `tagged_pids` that
nothing of a run is left behind; `kill_tagged` cleans up after a run that overstays.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parents[1]
TAG = "PD_LOCAL_TEST_TAG"


@dataclass
class Run:
    rc: int
    output: str
    seconds: float
    leftover: list[int]  # pids of the run still alive after it ended (then killed)

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]


def new_tag() -> str:
    return uuid.uuid4().hex


def env_for(tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    env[TAG] = tag
    return env


def tagged_pids(tag: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment carries PD_LOCAL_TEST_TAG=tag."""
    needle = f"{TAG}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":  # the state field follows the command name
            pids.append(int(entry.name))
    return pids


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL everything of a run that is still alive; returns those pids."""
    alive = tagged_pids(tag)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 120.0,
             max_restarts: int = 0, env: dict[str, str] | None = None) -> Run:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           str(SCRIPTS / script), *args]
    tag = new_tag()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(tag, env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tagged(tag)
        out, _ = proc.communicate()
        out += f"\n[harness] killed after {timeout} s"
    seconds = time.monotonic() - t0
    time.sleep(0.2)  # let killed children finish dying before counting them
    return Run(proc.returncode, out, seconds, kill_tagged(tag))


def free_port() -> int:
    """A loopback port that is free now and BELOW the kernel's ephemeral range. A port the kernel
    hands out (bind to 0) can be handed out again before the server binds it, to one of the gloo
    or TCPStore connections the world opens while it starts: the suspected cause of a server that
    once exited 1 before healthy mid-suite. Ports under the range are never handed out."""
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range taken: the kernel's choice after all
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(script: str, world_size: int, args: list[str], tag: str,
                env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `world_size` bare ranks of `script` (rank 0 hosts the TCPStore), tagged `tag`."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(world_size):
        rank_env = env_for(tag, {"RANK": str(rank), "LOCAL_RANK": str(rank),
                                 "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(port), **(env or {})})
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPTS / script), *args], cwd=REPO, env=rank_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs
