"""`pd-local serve --nnodes 2`: one torchrun world over two hosts, here two `pd-local serve`
processes on this machine over loopback (static rendezvous at --master-addr:--master-port).
Checked: it serves one engine's texts with KV crossing between the "hosts", SIGTERM to either
node drains and stops both with exit 0, and the refusals name their numbers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.dist_scripts.harness import REPO, env_for, free_port, kill_tagged, new_tag, tagged_pids
from tests.server_utils import wait_healthy
from tests.test_dist_serve import complete_all_bodies, reference_texts, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from tests.helpers import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("nodes"), tokenizer_dir=smollm2_dir, num_layers=3, seed=3)


def node_flags(model: Path, port: int, master_port: int) -> list[str]:
    return ["--model", str(model), "--port", str(port), "--set", "engine.max_model_len=512",
            "--set", "engine.kv_cache_gb=0.05", "--set", "timeouts.group_s=20", "--dtype", "bfloat16",
            "--threads", "1", "--prefill", "1", "--decode", "2",
            "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]


@pytest.mark.parametrize("stopped", [0, 1], ids=["sigterm-node-0", "sigterm-node-1"])
def test_two_nodes_serve_the_engine_texts_and_stop_on_sigterm_to_either(tiny_dir: Path, stopped: int) -> None:
    want = reference_texts(tiny_dir)
    port, tag = free_port(), new_tag()
    flags = node_flags(tiny_dir, port, free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "pd_local", "serve", *flags, "--node-rank", str(r)],
                              cwd=REPO, env=env_for(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for r in (0, 1)]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=300, proc=nodes[0])
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["detail"] == "3 workers (1P2D)", health
        responses = asyncio.run(complete_all_bodies(url))
        assert [r["choices"][0]["text"] for r in responses] == want
        # rank 1 (node 0) prefills for ranks 2 and 3 (node 1): the KV crossed between the nodes
        assert {r["pd_local"]["decode_rank"] for r in responses} == {2, 3}
        t0 = time.monotonic()
        nodes[stopped].send_signal(signal.SIGTERM)
        outs = [n.communicate(timeout=90)[0] for n in nodes]
        assert [n.returncode for n in nodes] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
        assert time.monotonic() - t0 < 60
        assert "all workers shut down" in outs[0]
        if stopped == 1:
            assert "SIGTERM: asking rank 0 to stop the server" in outs[1]
        time.sleep(0.2)
        assert tagged_pids(tag) == []
    finally:
        kill_tagged(tag)
        for n in nodes:
            if n.returncode is None:
                n.communicate()


def test_hosts_started_with_different_topologies_are_refused_by_every_rank(tiny_dir: Path) -> None:
    """Both worlds have 4 ranks, 2 a host, so torchrun forms one world: the ranks compare their
    configs and every host exits non-zero naming both, instead of building different groups."""
    tag, master = new_tag(), free_port()
    flags = node_flags(tiny_dir, free_port(), master)
    other = [*flags[:flags.index("--prefill")], "--colocated", "3", *flags[flags.index("--nnodes"):]]
    nodes = [subprocess.Popen([sys.executable, "-m", "pd_local", "serve", *f, "--node-rank", str(r)],
                              cwd=REPO, env=env_for(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for r, f in ((0, flags), (1, other))]
    try:
        outs = [n.communicate(timeout=120)[0] for n in nodes]
        assert all(n.returncode != 0 for n in nodes), [n.returncode for n in nodes]
        assert "runs another config (colocated-3" in outs[0] and "than this rank (1P2D" in outs[0], outs[0][-3000:]
        assert "runs another config (1P2D" in outs[1], outs[1][-3000:]
        time.sleep(0.2)
        assert tagged_pids(tag) == []
    finally:
        kill_tagged(tag)


def test_multinode_refusals_name_the_numbers(tiny_dir: Path) -> None:
    base = ["--model", str(tiny_dir), "--set", "engine.max_model_len=512", "--dry-run"]
    r = run_cli(*base, "--prefill", "1", "--decode", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
                "--master-port", "29500", "--nproc-per-node", "3")
    assert r.returncode == 2
    assert ("topology 1P2D needs 4 ranks, --nnodes 2 x --nproc-per-node 3 = 6: every node must run 2 "
            "(the same on every node)") in r.stderr
    r = run_cli(*base, "--prefill", "1", "--decode", "1", "--nnodes", "2", "--master-addr", "127.0.0.1",
                "--master-port", "29500")
    assert r.returncode == 2 and "topology 1P1D has 3 ranks: they do not split evenly over 2 nodes" in r.stderr
    r = run_cli(*base, "--prefill", "1", "--decode", "2", "--nnodes", "2")
    assert r.returncode == 2 and "--nnodes 2: give --master-addr and --master-port" in r.stderr
    r = run_cli(*base, "--prefill", "1", "--decode", "2", "--nnodes", "2", "--node-rank", "2")
    assert r.returncode == 2 and "--node-rank 2 is not one of the 2 nodes' 0..1" in r.stderr
    r = run_cli(*base, "--prefill", "1", "--decode", "2", "--nnodes", "2", "--node-rank", "1",
                "--master-addr", "10.0.0.1", "--master-port", "29500")
    assert r.returncode == 0, r.stderr
    assert ("--nnodes=2 --node-rank=1 --master-addr=10.0.0.1 --master-port=29500 --nproc-per-node=2"
            in r.stderr and "(node 1 of 2)" in r.stderr)
