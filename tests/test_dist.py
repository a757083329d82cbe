"""dist.py: roles and devices (in process), then multi-process checks over torchrun/gloo: every
link of a topology, the control channel, a peer killed or frozen mid-transfer, and
torchrun --max-restarts."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import torch

from tests.dist_scripts.harness import Run, kill_tagged, new_tag, spawn_ranks, torchrun
from pd_local.config import TopologyConfig
from pd_local.cluster.dist import Role, Topology, device_for_rank


def test_topology_disaggregated() -> None:
    topo = Topology.from_config(TopologyConfig(prefill=2, decode=3))
    assert topo.prefill_ranks == (1, 2) and topo.decode_ranks == (3, 4, 5)
    assert topo.world_size == 6
    assert [topo.role(r) for r in range(6)] == [Role.FRONTEND, Role.PREFILL, Role.PREFILL,
                                               Role.DECODE, Role.DECODE, Role.DECODE]
    assert topo.kv_pairs == ((1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5))
    with pytest.raises(ValueError, match="rank 6 is outside topology of 6 ranks"):
        topo.role(6)


def test_topology_colocated() -> None:
    topo = Topology.from_config(TopologyConfig(colocated=2))
    assert topo.prefill_ranks == () and topo.decode_ranks == (1, 2) and topo.kv_pairs == ()
    assert [topo.role(r) for r in range(3)] == [Role.FRONTEND, Role.COLOCATED, Role.COLOCATED]


def test_devices() -> None:
    assert device_for_rank(0, "cuda", 4) == torch.device("cpu")
    assert device_for_rank(3, "cpu", 0) == torch.device("cpu")
    assert [device_for_rank(r, "cuda", 4) for r in (1, 2, 3, 4)] == [
        torch.device("cuda", i) for i in range(4)]
    # share_device: more workers than GPUs wrap round
    assert device_for_rank(3, "cuda", 2) == torch.device("cuda", 0)


def ok(run: Run, expect_lines: int, pattern: str) -> None:
    assert run.rc == 0, run.output[-4000:]
    lines = run.lines("RESULT")
    assert len([x for x in lines if re.search(pattern, x)]) == expect_lines, run.output[-4000:]
    assert run.leftover == [], f"processes left behind: {run.leftover}"


@pytest.mark.multiproc
@pytest.mark.parametrize("flags, world", [
    (["--prefill", "1", "--decode", "2"], 4),
    (["--prefill", "2", "--decode", "2"], 5),
    (["--colocated", "2"], 3),
    (["--elastic", "3"], 4),  # a KV pair each way between every two workers
])
def test_every_link(flags: list[str], world: int) -> None:
    run = torchrun("check_links.py", world, flags, timeout=120)
    ok(run, world, r"links ok")


@pytest.mark.multiproc
def test_channel_order_heartbeats_and_idle_timeout() -> None:
    run = torchrun("check_channel.py", 2, ["--colocated", "1", "--set", "timeouts.group_s=2"],
                   timeout=120)
    ok(run, 2, r"ordered ok 600 messages")
    ok(run, 2, r"heartbeats ok")
    # Without heartbeats the idle link fails near the group timeout (2 s), not never.
    waits = [float(m) for m in re.findall(r"link down after ([\d.]+) s", run.output)]
    assert len(waits) == 2 and all(1.9 <= w <= 6 for w in waits), waits


GROUP_S = 10


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", ["KILL", "STOP"])
def test_peer_lost_mid_transfer_bare_ranks(sig: str) -> None:
    """No torchrun to tear the world down: the survivors' own links must end them, non-zero,
    within the group timeout of the victim's death (KILL) or freeze (STOP)."""
    tag = new_tag()
    procs = spawn_ranks("check_kill.py", 3, ["--prefill", "1", "--decode", "1",
                                             "--set", f"timeouts.group_s={GROUP_S}",
                                             "--signal", sig], tag)
    victim = procs[1]
    try:
        t_signal = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # start-up on a busy 2-core box can take a while
            line = victim.stdout.readline()
            if f"SIG{sig}" in line or not line:
                t_signal = time.monotonic()
                break
        assert t_signal is not None, "the victim never reached its signal"
        for rank in (0, 2):
            try:
                rc = procs[rank].wait(timeout=max(0.0, t_signal + GROUP_S + 10 - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still running {GROUP_S + 10} s after the victim's "
                            f"SIG{sig}")
            out = procs[rank].stdout.read()
            assert rc == 1, f"rank {rank} exited {rc}:\n{out[-3000:]}"
            assert "LinkDown" in out, out[-3000:]
    finally:
        kill_tagged(tag)  # the frozen victim, and anything a failure left
        for p in procs:
            p.wait()
            p.stdout.close()


@pytest.mark.multiproc
def test_peer_killed_under_torchrun_leaves_nothing() -> None:
    run = torchrun("check_kill.py", 3, ["--prefill", "1", "--decode", "1",
                                        "--set", f"timeouts.group_s={GROUP_S}"], timeout=90)
    assert "SIGKILL" in run.output, run.output[-3000:]
    assert run.rc != 0 and run.seconds < 60, (run.rc, run.seconds, run.output[-3000:])
    assert run.leftover == [], f"processes left behind: {run.leftover}"


@pytest.mark.multiproc
def test_torchrun_max_restarts() -> None:
    run = torchrun("check_restart.py", 3, ["--prefill", "1", "--decode", "1"], max_restarts=1,
                   timeout=120)
    assert "attempt 0: rank 1 fails on purpose" in run.output
    ok(run, 3, r"attempt 1 ok")


def test_the_one_process_world_runs_colocated_1_and_fails_loudly(tmp_path) -> None:
    """cluster/local.py: other topologies are refused by name; a worker that cannot start
    fails the router (unhealthy, the reason given) instead of leaving it waiting."""
    from pd_local.cluster.local import LocalWorld
    from pd_local.config import ConfigError, ServeConfig

    with pytest.raises(ConfigError, match="one process runs colocated-1 on cpu, not 1P1D on cpu"):
        LocalWorld(ServeConfig(model=str(tmp_path), topology=TopologyConfig(prefill=1, decode=1)))
    world = LocalWorld(ServeConfig(model="/no/such/model", topology=TopologyConfig(colocated=1)))
    assert world.router.ready.wait(timeout=60)
    healthy, why = world.router.healthy()
    assert not healthy and "worker 1 failed" in why and "/no/such/model" in why
    world.shutdown()
    assert world.error is not None and not world.thread.is_alive()
