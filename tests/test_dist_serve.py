"""`pd-local serve` end to end: real torchrun ranks (router, prefill, decode / colocated loops)
behind real HTTP, on a tiny random Llama with SmolLM2's tokenizer so a world starts in seconds.

- every topology gives a seeded request exactly the tokens a single in-process Engine gives;
- a client that goes away frees its blocks on the decode rank; so do finished requests;
- SIGINT to rank 0 shuts every rank down in order, torchrun exits 0, nothing is left;
- a decode rank killed mid-service takes the server down non-zero, nothing is left;
- a world that does not fit the config is refused with the numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from pd_local.engine import threads as cpu_threads
from tests.dist_scripts.harness import REPO, tagged_pids, torchrun
from tests.helpers import make_tiny_hf_model
from tests.server_utils import metric_values, serving

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("serve"), tokenizer_dir=smollm2_dir,
                              num_layers=3, seed=3)


# 16 concurrent requests of mixed lengths (5..140 tokens), half greedy, half seeded sampling.
PROMPTS = [[1 + (7 * i + 3 * j) % 400 for j in range(5 + (37 * i) % 136)] for i in range(16)]


def requests_params() -> list[dict]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        greedy = i % 2 == 1
        out.append({"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                    "temperature": 0.0 if greedy else 0.9, "top_p": 0.95, "seed": 100 + i})
    return out


def reference_texts(model_dir: Path, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """What one in-process Engine (all prompts in flight together) produces."""
    from pd_local.config import EngineConfig
    from pd_local.engine.engine import Engine
    from pd_local.model.weights import load_model
    from pd_local.engine.sampling import SamplingParams
    from pd_local.tokenizer import Tokenizer

    model, _ = load_model(model_dir, dtype)
    tok = Tokenizer.from_dir(model_dir)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.05), stop_token_ids=tok.stop_token_ids)
    params = [SamplingParams(temperature=r["temperature"], top_p=r["top_p"], seed=r["seed"],
                             max_tokens=MAX_TOKENS, ignore_eos=True) for r in requests_params()]
    return [tok.decode(ids) for ids, _ in engine.generate(PROMPTS, params)]


async def complete_all(url: str) -> list[str]:
    return [r["choices"][0]["text"] for r in await complete_all_bodies(url)]


async def complete_all_bodies(url: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=60) as c:
        rs = await asyncio.gather(*[c.post(f"{url}/v1/completions", json=body)
                                    for body in requests_params()])
    for r in rs:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    return [r.json() for r in rs]


def check_cluster_accounts_for(url: str, responses: list[dict]) -> None:
    """Each response names ranks of the right roles, and /v1/cluster's per-rank token counters
    add up to exactly the responses' prompt (less cached) and completion tokens."""
    ranks = {r["rank"]: r for r in httpx.get(f"{url}/v1/cluster", timeout=10).json()["ranks"]}
    colocated = all(r["role"] == "colocated" for r in ranks.values())
    for body in responses:
        ext = body["pd_local"]
        assert ranks[ext["decode_rank"]]["role"] in ("decode", "colocated", "elastic"), ext
        want = ("colocated", "elastic") if colocated else ("prefill", "elastic")
        assert ranks[ext["prefill_rank"]]["role"] in want, ext
        if colocated:
            assert ext["prefill_rank"] == ext["decode_rank"]
    usage = [b["usage"] for b in responses]
    computed = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    assert sum(r["prefilled_tokens"] for r in ranks.values()) == computed
    assert sum(r["generated_tokens"] for r in ranks.values()) == sum(u["completion_tokens"] for u in usage)
    assert all(r["generated_tokens"] == 0 for r in ranks.values() if r["role"] == "prefill")


def check_threads(url: str, threads: int = 0) -> None:
    """Each worker computes with the threads and CPUs its plan gives it on this process's mask
    (the server's ranks inherit it), as it measured them itself, in /v1/cluster and /metrics."""
    ranks = {r["rank"]: r for r in httpx.get(f"{url}/v1/cluster", timeout=10).json()["ranks"]}
    plans = cpu_threads.plan_world(cpu_threads.usable_cores(), len(ranks), threads)
    mask = cpu_threads.format_cpu_list(sorted(os.sched_getaffinity(0)))
    for rank, r in ranks.items():
        want = plans[rank]
        assert r["threads"] == want.threads, (rank, r, want)
        assert r["cpus"] == (cpu_threads.format_cpu_list(want.cpus) if want.cpus else mask), (rank, r)
    gauge = metric_values(url, "pd_local_rank_threads")
    assert sorted(gauge.values()) == sorted(float(p.threads) for p in plans[1:]), gauge


async def disconnect_mid_stream(url: str) -> None:
    body = {"prompt": PROMPTS[4], "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=60) as c:
        async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream


def wait_blocks_free(url: str, timeout: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        free = metric_values(url, "pd_local_kv_blocks_free")
        total = metric_values(url, "pd_local_kv_blocks_total")
        decode = {k: v for k, v in free.items() if 'role="prefill"' not in k}
        if all(v == total[k] and v > 0 for k, v in decode.items()) or time.monotonic() > deadline:
            return {k: (v, total[k]) for k, v in decode.items()}
        time.sleep(0.2)


@pytest.mark.parametrize("flags", [
    ["--colocated", "1"],
    ["--colocated", "2", "--threads", "2"],
    ["--prefill", "1", "--decode", "1"],
    ["--prefill", "1", "--decode", "2", "--transfer", "whole", "--routing", "round_robin"],
    ["--prefill", "2", "--decode", "1"],
    ["--elastic", "2", "--routing", "round_robin"],
    ["--elastic", "2", "--set", "slo.tpot_budget=true", "--set", "slo.tpot_ms=30"],
], ids=["colocated-1", "colocated-2", "1P1D-layerwise", "1P2D-whole-rr", "2P1D", "elastic-2-rr", "elastic-2"])
def test_serve_matches_engine_frees_blocks_and_stops_cleanly(tiny_dir: Path,
                                                             flags: list[str]) -> None:
    want = reference_texts(tiny_dir)
    with serving(tiny_dir, *flags) as s:
        responses = asyncio.run(complete_all_bodies(s.url))
        assert [r["choices"][0]["text"] for r in responses] == want
        check_cluster_accounts_for(s.url, responses)
        check_threads(s.url, int(flags[flags.index("--threads") + 1]) if "--threads" in flags else 0)
        if "--colocated" not in flags:  # elastic: the requests prefilled on another rank
            transfers = metric_values(s.url, "pd_local_kv_transfers_total")
            moved = [r for r in responses if r["pd_local"]["prefill_rank"] != r["pd_local"]["decode_rank"]]
            assert list(transfers.values()) == [len(moved)] and (moved or "slo.tpot_ms=30" in flags)
            if "--elastic" in flags:  # round robin: both ways, and some prefilled where they decode
                pairs = {(r["pd_local"]["prefill_rank"], r["pd_local"]["decode_rank"]) for r in responses}
                assert {(1, 2), (2, 1), (1, 1), (2, 2)} <= pairs, pairs
        asyncio.run(disconnect_mid_stream(s.url))
        blocks = wait_blocks_free(s.url)
        assert blocks and all(free == total for free, total in blocks.values()), blocks
        aborted = metric_values(s.url, "pd_local_requests_total")['{outcome="abort"}']
        assert aborted == 1
        os.kill(s.rank_pid(0), signal.SIGINT)
        rc, out = s.wait(timeout=60)
        assert rc == 0, out[-4000:]
        assert "all workers shut down" in out
        assert s.leftover() == []


@pytest.mark.parametrize("flags", [[], ["--transfer", "whole"]], ids=["layerwise", "whole"])
def test_1p1d_prefill_rank_in_16_token_chunks_matches_engine(tiny_dir: Path,
                                                             flags: list[str]) -> None:
    """The prefill rank chunks every prompt (5..140 tokens) into steps of 16 tokens: the KV
    reaches the decode rank chunk by chunk over ~9 transfers per long prompt, and the tokens
    are still exactly the in-process engine's (which prefills in chunks of 256)."""
    want = reference_texts(tiny_dir)
    with serving(tiny_dir, "--prefill", "1", "--decode", "1", *flags,
                 "--set", "engine.max_prefill_tokens=16") as s:
        assert asyncio.run(complete_all(s.url)) == want
        transfers = metric_values(s.url, "pd_local_kv_transfers_total")
        assert list(transfers.values()) == [len(PROMPTS)]  # one record per prompt, not per chunk
        blocks = wait_blocks_free(s.url)
        assert blocks and all(free == total for free, total in blocks.values()), blocks


def first_non_200_health(url: str, timeout: float) -> httpx.Response:
    """Polls /health every 20 ms; a refused connection fails the test (it must say 503)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/health", timeout=5)
        if r.status_code != 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def test_dead_decode_rank_takes_the_server_down(tiny_dir: Path) -> None:
    with serving(tiny_dir, "--prefill", "1", "--decode", "1") as s:
        assert asyncio.run(complete_all(s.url))
        t0 = time.monotonic()
        os.kill(s.rank_pid(2), signal.SIGKILL)
        # From the failure on, /health and new requests answer 503 naming it (no refused
        # connection, no hang), and then the whole tree exits non-zero.
        health = first_non_200_health(s.url, timeout=30)
        assert health.status_code == 503, health.text
        assert "router failed" in health.json()["detail"], health.text
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["message"].startswith("server unavailable: router failed")
        rc, out = s.wait(timeout=90)
        assert rc != 0 and time.monotonic() - t0 < 30, (rc, out[-3000:])
        assert "router failed" in out or "LinkDown" in out, out[-3000:]
        assert s.leftover() == []


async def stream_tokens(c: httpx.AsyncClient, url: str, max_tokens: int,
                        started: asyncio.Event | None = None
                        ) -> tuple[int, str | None, str | None]:
    """(tokens streamed, finish_reason, error message or 'HTTP <status>') of one streaming
    completion; `started` is set at its first token."""
    body = {"prompt": PROMPTS[3], "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    n, finish, error = 0, None, None
    async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return 0, None, f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                error = event["error"]["message"]
                continue
            for choice in event["choices"]:
                n += bool(choice["text"])
                finish = choice["finish_reason"] or finish
            if n and started is not None:
                started.set()
    return n, finish, error


def test_sigterm_drains_in_flight_requests_then_every_rank_exits_0(tiny_dir: Path) -> None:
    """SIGTERM to `pd-local serve` (systemd, docker stop): 503 for new requests, in-flight ones
    finish within the grace period, the rest are aborted with a message naming it, and every
    rank exits 0 with no traceback and nothing left. One decode slot (max_num_seqs=1): 40 long
    requests queue behind a short one (15,200 tokens: more than any CPU decodes in the grace),
    so some finish within the grace and the rest are aborted at its end."""
    grace = 10.0
    with serving(tiny_dir, "--prefill", "1", "--decode", "1", "--set", "engine.max_num_seqs=1",
                 "--set", f"server.shutdown_grace_s={grace}") as s:
        async def scenario() -> tuple[tuple, list, httpx.Response, httpx.Response]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                started = asyncio.Event()
                short = asyncio.create_task(stream_tokens(c, s.url, 40, started))
                await started.wait()
                queued = [asyncio.create_task(stream_tokens(c, s.url, 380)) for _ in range(40)]
                # Until the 40 are admitted (the short one may have finished meanwhile).
                while (await asyncio.to_thread(metric_values, s.url,
                                               "pd_local_requests_in_flight")).get("", 0) < 40:
                    await asyncio.sleep(0.05)
                s.proc.send_signal(signal.SIGTERM)
                health = await asyncio.to_thread(first_non_200_health, s.url, 10)
                late = await c.post(f"{s.url}/v1/completions",
                                    json={"prompt": "hi", "max_tokens": 2})
                return await short, await asyncio.gather(*queued), health, late
        t0 = time.monotonic()
        short, queued, health, late = asyncio.run(scenario())
        assert health.status_code == 503 and "shutting down" in health.json()["detail"]
        assert late.status_code == 503, late.text
        assert "the server is shutting down" in late.json()["error"]["message"]
        assert short == (40, "length", None), short
        # Each queued one finished (some within the grace) or was aborted at its end, with the
        # reason; one that was not admitted before the signal got 503.
        finished = [r for r in queued if r == (380, "length", None)]
        aborted = [r for r in queued if r[2] is not None and "grace period" in r[2]]
        assert finished and aborted, queued
        assert all(r in finished or r in aborted or r[2] == "HTTP 503" for r in queued), queued
        rc, out = s.wait(timeout=60)
        assert rc == 0, out[-4000:]
        assert time.monotonic() - t0 < grace + 30, out[-4000:]
        assert "Traceback" not in out and "all workers shut down" in out, out[-4000:]
        assert s.leftover() == []


@pytest.mark.parametrize("flags", [["--prefill", "1", "--decode", "1"], ["--colocated", "1"]],
                         ids=["1P1D", "colocated-1"])
def test_ctrl_c_stops_every_rank_cleanly(tiny_dir: Path, flags: list[str]) -> None:
    """Ctrl-C in a terminal = SIGINT to the foreground process group: exit 0, no traceback, at
    most one line per rank about it (plus the supervisor's)."""
    world = 3 if "--prefill" in flags else 2
    with serving(tiny_dir, *flags) as s:
        assert asyncio.run(complete_all(s.url))
        os.killpg(s.proc.pid, signal.SIGINT)
        rc, out = s.wait(timeout=60)
        assert rc == 0, out[-4000:]
        assert "Traceback" not in out, out[-4000:]
        assert 1 <= len([ln for ln in out.splitlines() if "SIGINT" in ln]) <= world + 1, out
        assert s.leftover() == []


def test_a_second_ctrl_c_kills_every_rank_at_once(tiny_dir: Path) -> None:
    with serving(tiny_dir, "--prefill", "1", "--decode", "1") as s:
        os.killpg(s.proc.pid, signal.SIGINT)
        time.sleep(0.3)
        t0 = time.monotonic()
        os.killpg(s.proc.pid, signal.SIGINT)
        rc, out = s.wait(timeout=30)
        assert time.monotonic() - t0 < 5 and "killing every rank now" in out, out[-4000:]
        assert s.leftover() == []


def test_api_key_reaches_rank_0_but_no_command_line(tiny_dir: Path) -> None:
    with serving(tiny_dir, "--colocated", "1", "--api-key", "sekret-42") as s:
        body = {"prompt": PROMPTS[0], "max_tokens": 2}
        assert httpx.post(f"{s.url}/v1/completions", json=body).status_code == 401
        ok = httpx.post(f"{s.url}/v1/completions", json=body,
                        headers={"Authorization": "Bearer sekret-42"})
        assert ok.status_code == 200, ok.text
        for pid in tagged_pids(s.tag):
            assert b"sekret-42" not in Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.parametrize("flags", [["--prefill", "1", "--decode", "1"], ["--colocated", "1"]],
                         ids=["1P1D", "colocated-1"])
def test_workers_loading_longer_than_the_group_timeout(tiny_dir: Path, flags: list[str]) -> None:
    world = 3 if "--prefill" in flags else 2
    run = torchrun("check_slow_load.py", world,
                   ["--model", str(tiny_dir), "--set", "engine.max_model_len=512",
                    "--set", "timeouts.group_s=2", *flags], timeout=120)
    assert run.rc == 0, run.output[-4000:]
    assert len(run.lines("RESULT")) == world and run.leftover == []


@pytest.mark.parametrize("flags", [
    ["--prefill", "1", "--decode", "2"],
    ["--prefill", "1", "--decode", "1", "--transfer", "whole"],
], ids=["1P2D-layerwise", "1P1D-whole"])
def test_a_prefill_longer_than_the_group_timeout_completes(tiny_dir: Path,
                                                            flags: list[str]) -> None:
    """A regression test: a 3-group-timeout prefill (a sleep hook) must neither kill a
    link nor make rank 0 declare the busy prefill rank dead."""
    world = 1 + int(flags[1]) + int(flags[3])
    run = torchrun("check_slow_prefill.py", world,
                   ["--model", str(tiny_dir), "--set", "engine.max_model_len=512",
                    "--set", "timeouts.group_s=2", *flags], timeout=120)
    assert run.rc == 0, run.output[-4000:]
    assert len(run.lines("RESULT")) == world and run.leftover == []
    assert " ERROR" not in run.output, run.output[-4000:]  # no link went down, no rank failed


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pd_local", "serve", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_serve_refuses_before_starting(tiny_dir: Path) -> None:
    r = run_cli("--model", "/no/such/model")
    assert r.returncode == 2 and "model directory /no/such/model not found" in r.stderr
    r = run_cli("--model", str(tiny_dir))  # max_model_len 2048 > the tiny model's 512
    assert r.returncode == 2 and "exceeds the model's max_position_embeddings = 512" in r.stderr
    r = run_cli("--prefill", "1")
    assert r.returncode == 2 and "--prefill and --decode go together" in r.stderr
    r = run_cli("--model", str(tiny_dir), "--set", "engine.max_model_len=512",
                "--colocated", "3", "--dry-run")
    assert r.returncode == 0 and "--nproc-per-node=4" in r.stderr


def test_launch_refuses_a_world_of_the_wrong_size(tiny_dir: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           "--module", "pd_local.launch", "--model", str(tiny_dir),
           "--set", "engine.max_model_len=512", "--prefill", "1", "--decode", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0
    assert ("topology 1P2D needs 4 ranks (1 front-end + 3 workers: 1 prefill + 2 decode), "
            "torchrun started 3") in r.stderr


def test_smollm2_gives_the_engine_tokens_in_2p1d_and_1p2d(smollm2_f32_dir: Path) -> None:
    """The real model, 16 concurrent mixed-length requests: the same tokens as one in-process
    engine in two disaggregated topologies (the tiny model covers the other three). float32:
    native on every CPU kind (bf16 is emulated on AVX2, where it doubled this test's time)."""
    want = reference_texts(smollm2_f32_dir, torch.float32)
    for flags in (["--prefill", "2", "--decode", "1"], ["--prefill", "1", "--decode", "2"]):
        with serving(smollm2_f32_dir, *flags, "--dtype", "float32") as s:
            assert asyncio.run(complete_all(s.url)) == want, flags


async def abort_at_random_points(url: str, n: int, seed: int) -> list[int]:
    """n streamed requests, each dropped by its client after a random delay (some before the
    reservation, some while prefilling or transferring, some mid-decode). Returns how many data
    lines each saw before it went away."""
    import random

    rng = random.Random(seed)

    async def one(c: httpx.AsyncClient, prompt: list[int], delay: float) -> int:
        body = {"prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    seen += line.startswith("data:")

        try:
            await asyncio.wait_for(consume(), timeout=delay)
        except asyncio.TimeoutError:
            pass  # cancelled: the connection closes, the server aborts the request
        return seen

    async with httpx.AsyncClient(timeout=60) as c:
        prompts = [PROMPTS[i % len(PROMPTS)] * 3 for i in range(n)]  # up to ~420 tokens
        return await asyncio.gather(*[one(c, p, rng.uniform(0.0, 1.5)) for p in prompts])


@pytest.mark.parametrize("flags", [["--prefill", "1", "--decode", "1"], ["--prefill", "2", "--decode", "2"],
                                   ["--elastic", "2", "--routing", "round_robin"]],
                         ids=["1P1D", "2P2D", "elastic-2-rr"])
def test_aborts_in_every_phase_return_every_block(tiny_dir: Path, flags: list[str]) -> None:
    """max_num_seqs=3 makes requests queue for a reservation (back-pressure), long prompts make
    prefill and transfer take time, and clients leave at random points of all of it."""
    with serving(tiny_dir, *flags, "--set", "engine.max_num_seqs=3") as s:
        seen = asyncio.run(abort_at_random_points(s.url, 30, seed=1))
        assert any(n == 0 for n in seen) and any(n > 3 for n in seen), seen  # early and late aborts
        blocks = wait_blocks_free(s.url, timeout=30)
        assert blocks and all(free == total for free, total in blocks.values()), blocks
        for name in ("pd_local_running_requests", "pd_local_queue_depth"):
            assert set(metric_values(s.url, name).values()) == {0.0}, name
        assert metric_values(s.url, "pd_local_requests_in_flight")[""] == 0
        # the server is still serving correctly afterwards
        assert asyncio.run(complete_all(s.url)) == reference_texts(tiny_dir)


async def storm(url: str, n: int, seed: int, flips: bool = False) -> list[int]:
    """n streaming clients at once, each gone after 1-20 chunks (or at its end); returns the
    chunks each saw. A vanished client is a closed connection, nothing more polite. flips: the
    elastic ranks change modes all the while (POST /v1/cluster/mode every 0.2 s)."""
    import random

    rng = random.Random(seed)

    async def one(c: httpx.AsyncClient, prompt: list[int], leave_after: int) -> int:
        body = {"prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
        seen = 0
        async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen >= leave_after:
                    break
        return seen

    cycled = asyncio.Event()  # the flipper went through its changes at least once (4 flips)

    async def flipper(c: httpx.AsyncClient) -> None:
        modes = [(2, "mixed"), (1, "prefill"), (1, "decode"), (2, "prefill"), (2, "mixed"), (1, "auto")]
        for i in itertools.count():
            r = await c.post(f"{url}/v1/cluster/mode", json=dict(zip(("rank", "mode"), modes[i % len(modes)])))
            assert r.status_code == 200, r.text
            if i == len(modes) - 1:
                cycled.set()
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=n + 5)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        flipping = asyncio.create_task(flipper(c)) if flips else None
        seen = await asyncio.gather(*[one(c, PROMPTS[rng.randrange(len(PROMPTS))],
                                          rng.randint(1, 20)) for _ in range(n)])
        if flipping is not None:  # a short storm (a fast CPU) still sees a whole cycle of flips
            await asyncio.wait([flipping, asyncio.ensure_future(cycled.wait())], return_when=asyncio.FIRST_COMPLETED)
            if flipping.done():
                flipping.result()  # it failed: raise what it raised
            flipping.cancel()
        return seen


@pytest.mark.parametrize("flags", [["--prefill", "1", "--decode", "1"],
                                   ["--prefill", "2", "--decode", "2"],
                                   ["--elastic", "2"]], ids=["1P1D", "2P2D", "elastic-2"])
def test_storms_of_vanishing_clients_leave_the_server_healthy_and_every_block_free(
        tiny_dir: Path, flags: list[str]) -> None:
    """3 storms of 50 streaming clients that vanish after 1-20 chunks, on a KV cache of ~100
    blocks (0.0006 GB here), so reservations queue: after each, /health is 200, nothing is in
    flight or queued, and every decode rank has all its blocks back."""
    with serving(tiny_dir, *flags, "--set", "engine.kv_cache_gb=0.0006") as s:
        total = metric_values(s.url, "pd_local_kv_blocks_total")
        assert all(v < 200 for k, v in total.items() if 'role="prefill"' not in k), total
        for i in range(3):
            seen = asyncio.run(storm(s.url, 50, seed=i, flips="--elastic" in flags))
            assert all(n >= 1 for n in seen), seen
            assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200
            blocks = wait_blocks_free(s.url, timeout=60)
            assert blocks and all(free == total for free, total in blocks.values()), (i, blocks)
            assert metric_values(s.url, "pd_local_requests_in_flight")[""] == 0
            for name in ("pd_local_running_requests", "pd_local_queue_depth"):
                assert set(metric_values(s.url, name).values()) == {0.0}, (i, name)
        disconnects = metric_values(s.url, "pd_local_client_disconnects_total")[""]
        assert disconnects >= 100, disconnects  # most of the 150 left before their end
        if "--elastic" in flags:  # flips and clients leaving unevenly: requests moved
            assert metric_values(s.url, "pd_local_migrations_total")[""] >= 1
            assert sum(metric_values(s.url, "pd_local_flips_total").values()) >= 6


def test_queued_reservations_are_admitted_when_a_step_frees_room(tiny_dir: Path) -> None:
    """max_num_seqs=1: the second and third requests wait in the decode rank's admission queue
    until the first finishes inside a decode step. That step must admit them: no message comes
    to wake the decode loop otherwise (it used to block for ever here)."""
    async def three(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            body = {"prompt": PROMPTS[3], "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json=body) for _ in range(3)])

    with serving(tiny_dir, "--prefill", "1", "--decode", "1", "--set", "engine.max_num_seqs=1") as s:
        rs = asyncio.run(three(s.url))
        assert [r.status_code for r in rs] == [200, 200, 200]
        assert len({r.json()["choices"][0]["text"] for r in rs}) == 1  # greedy: all the same


def test_clients_gone_while_queued_on_a_prefill_rank_leave_no_queued_work(tiny_dir: Path) -> None:
    """24 prompts of 400 tokens, prefilled 16 tokens a step, so most still wait on the prefill
    rank when their clients leave. The prefill rank drops them and never reports them done: the
    router must take them off that rank's queued work itself (it used to count them for ever,
    and "least queued prefill work" routing drifted)."""
    prompts = [[1 + (7 * i + 3 * j) % 400 for j in range(400)] for i in range(24)]

    async def leave_early(url: str) -> dict[str, float]:
        async def one(c: httpx.AsyncClient, prompt: list[int]) -> None:
            body = {"prompt": prompt, "max_tokens": 50, "ignore_eos": True, "stream": True}
            async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                await asyncio.sleep(0.8)  # then leave: closing the connection is the abort

        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as c:
            tasks = [asyncio.create_task(one(c, p)) for p in prompts]
            await asyncio.sleep(0.5)
            queued = await asyncio.to_thread(metric_values, url, "pd_local_prefill_queued_tokens")
            await asyncio.gather(*tasks)
        return queued

    with serving(tiny_dir, "--prefill", "1", "--decode", "1",
                 "--set", "engine.max_prefill_tokens=16") as s:
        queued = asyncio.run(leave_early(s.url))
        key = '{rank="1",role="prefill"}'
        assert queued[key] > 0, queued  # the clients did leave while prompts were queued there
        deadline = time.monotonic() + 20
        while True:
            now = metric_values(s.url, "pd_local_prefill_queued_tokens")
            if now[key] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert now[key] == 0, now
        assert metric_values(s.url, "pd_local_requests_total")['{outcome="abort"}'] > 0
        blocks = wait_blocks_free(s.url)
        assert blocks and all(free == total for free, total in blocks.values()), blocks
        # the server is still serving correctly afterwards
        assert asyncio.run(complete_all(s.url)) == reference_texts(tiny_dir)


def engine_texts(model_dir: Path, prompts: list[list[int]], params: list,
                 dtype: torch.dtype = torch.bfloat16) -> list[str]:
    from pd_local.config import EngineConfig
    from pd_local.engine.engine import Engine
    from pd_local.model.weights import load_model
    from pd_local.tokenizer import Tokenizer

    model, _ = load_model(model_dir, dtype)
    tok = Tokenizer.from_dir(model_dir)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.05), stop_token_ids=tok.stop_token_ids)
    return [tok.decode(ids) for ids, _ in engine.generate(prompts, params)]


def test_elastic_workers_move_a_running_request_to_the_idle_one_with_identical_tokens(
        tiny_dir: Path) -> None:
    """Round robin puts two long answers (both seeded sampling) on rank 1 and two short ones
    on rank 2; once the short ones end, rank 1 decodes 2 and rank 2 none, so the router moves
    one long answer over (which one depends on when each got its first token), mid-stream: both
    texts stay those of one engine (the moved one's generator state went with it), the moved
    one reports its migration, /metrics counts it, and every block comes back."""
    from pd_local.engine.sampling import SamplingParams

    prompts = [PROMPTS[3], PROMPTS[4], PROMPTS[5], PROMPTS[6]]
    bodies = [{"prompt": p, "max_tokens": n, "ignore_eos": True, "temperature": t, "seed": 7}
              for p, n, t in zip(prompts, (300, 4, 300, 4), (0.9, 0.0, 0.8, 0.0))]
    want = engine_texts(tiny_dir, prompts, [SamplingParams(temperature=b["temperature"], seed=7,
                                                           max_tokens=b["max_tokens"], ignore_eos=True)
                                            for b in bodies])

    async def send_in_order(url: str) -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as c:
            tasks = []
            for body in bodies:  # one at a time into the router, so round robin alternates ranks
                tasks.append(asyncio.create_task(c.post(f"{url}/v1/completions", json=body)))
                await asyncio.sleep(0.05)
            return [r.json() for r in await asyncio.gather(*tasks)]

    with serving(tiny_dir, "--elastic", "2", "--routing", "round_robin") as s:
        got = asyncio.run(send_in_order(s.url))
        assert [b["choices"][0]["text"] for b in got] == want
        moved = [b for b in got if "migration" in b["pd_local"]["timings_ms"]]
        assert len(moved) >= 1 and all(b["pd_local"]["decode_rank"] == 2 for b in moved), \
            [b["pd_local"] for b in got]
        assert moved[0] in (got[0], got[2]), [b["pd_local"] for b in got]  # a seeded long answer
        assert metric_values(s.url, "pd_local_migrations_total")[""] == len(moved)
        assert metric_values(s.url, "pd_local_migration_bytes_total")[""] > 0
        blocks = wait_blocks_free(s.url)
        assert blocks and all(free == total for free, total in blocks.values()), blocks


@pytest.mark.parametrize("routing", ["load", "round_robin"])
def test_an_elastic_rank_flipped_to_prefill_hands_its_decodes_away_and_takes_no_more(
        tiny_dir: Path, routing: str) -> None:
    """The flip is checked by the work, not by the call returning: a long answer decodes on rank
    R; POST /v1/cluster/mode sets R to prefill; its request moves to the other rank mid-stream
    (same text as one engine), R ends up decoding nothing, generates no token from then on, and
    the next request decodes on the other rank. Refusals name the problem; auto hands the modes
    back to the policy. Every routing policy leaves a mostly-prefill rank out of decode placement."""
    from pd_local.engine.sampling import SamplingParams

    long = {"prompt": PROMPTS[0], "max_tokens": 450, "ignore_eos": True, "temperature": 0}
    short = {"prompt": PROMPTS[2], "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    want = engine_texts(tiny_dir, [PROMPTS[0], PROMPTS[2]],
                        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (450, 40)])

    async def flip_under_load(url: str) -> tuple[int, dict, dict, dict, dict]:
        async with httpx.AsyncClient(timeout=120) as c:
            async def cluster() -> dict[int, dict]:
                return {r["rank"]: r for r in (await c.get(f"{url}/v1/cluster")).json()["ranks"]}

            first = asyncio.create_task(c.post(f"{url}/v1/completions", json=long))
            while not any(r["running"] for r in (await cluster()).values()):
                await asyncio.sleep(0.02)
            rank = next(k for k, r in (await cluster()).items() if r["running"])
            r = await c.post(f"{url}/v1/cluster/mode", json={"rank": rank, "mode": "prefill"})
            assert r.status_code == 200 and r.json()["control"] == "operator", r.text
            other = 3 - rank
            bad = await c.post(f"{url}/v1/cluster/mode", json={"rank": other, "mode": "prefill"})
            assert bad.status_code == 400 and f"rank {other} is the last rank that decodes" in bad.text
            for body, text in (({"rank": 9, "mode": "mixed"}, "rank 9 is not an elastic worker"),
                               ({"rank": 1, "mode": "both"}, "mode must be one of mixed, prefill, decode or auto")):
                bad = await c.post(f"{url}/v1/cluster/mode", json=body)
                assert bad.status_code == 400 and text in bad.text, bad.text
            while (await cluster())[rank]["running"] and not first.done():
                await asyncio.sleep(0.02)
            emptied = await cluster()
            seconds = await asyncio.gather(*[c.post(f"{url}/v1/completions", json=short) for _ in range(3)])
            second = seconds[0].json()
            assert [r.json()["pd_local"]["decode_rank"] for r in seconds] == [other] * 3
            assert len({r.json()["choices"][0]["text"] for r in seconds}) == 1
            done = await cluster()
            return rank, (await first).json(), second, emptied, done

    with serving(tiny_dir, "--elastic", "2", "--routing", routing) as s:
        rank, first, second, emptied, done = asyncio.run(flip_under_load(s.url))
        assert [first["choices"][0]["text"], second["choices"][0]["text"]] == want
        assert "migration" in first["pd_local"]["timings_ms"], first["pd_local"]
        assert first["pd_local"]["decode_rank"] != rank
        assert emptied[rank]["mode"] == "prefill" and emptied[rank]["running"] == 0
        assert second["pd_local"]["decode_rank"] != rank
        assert done[rank]["generated_tokens"] == emptied[rank]["generated_tokens"]  # decoded nothing since
        assert done[3 - rank]["generated_tokens"] > emptied[3 - rank]["generated_tokens"]
        assert metric_values(s.url, "pd_local_flips_total") == {'{to="prefill"}': 1.0}
        assert metric_values(s.url, "pd_local_flip_seconds_count") == {'{to="prefill"}': 1.0}
        assert metric_values(s.url, "pd_local_migrations_total")[""] == 1
        assert httpx.get(f"{s.url}/v1/cluster", timeout=10).json()["mode_control"] == "operator"
        r = httpx.post(f"{s.url}/v1/cluster/mode", json={"rank": rank, "mode": "auto"}, timeout=10)
        assert r.status_code == 200 and r.json()["control"] == "policy"
        deadline = time.monotonic() + 10
        while httpx.get(f"{s.url}/v1/cluster", timeout=10).json()["mode_control"] != "policy":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        blocks = wait_blocks_free(s.url)
        assert blocks and all(free == total for free, total in blocks.values()), blocks


def test_bench_draws_the_elastic_ranks_modes_over_a_shifting_run(
        tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pd-local bench --workload shifting` samples each elastic rank's mode from /v1/cluster:
    rank 2, set to prefill a second into the run, shows mixed then P in the printed strip and in
    the result file's rank_modes."""
    import threading

    from pd_local.loadtest.cli import bench_main

    result = tmp_path / "r.json"
    with serving(tiny_dir, "--elastic", "2") as s:
        pin = threading.Timer(1.0, lambda: httpx.post(f"{s.url}/v1/cluster/mode",
                                                      json={"rank": 2, "mode": "prefill"}, timeout=10))
        pin.start()
        code = bench_main(["--base-url", s.url, "--endpoint", "/v1/completions", "--workload", "shifting",
                           "--phases", "prefill,decode", "--phase-duration", "1.5", "--request-rate", "4",
                           "--input-len", "8", "--output-len", "8", "--long-input-len", "60",
                           "--long-output-len", "2", "--ignore-eos", "--warmup", "0", "--quiet",
                           "--result-file", str(result)])
        pin.join()
    out = capsys.readouterr().out
    assert code == 0, out
    samples = json.loads(result.read_text())["rank_modes"]
    seen2 = [x["modes"]["2"] for x in samples]
    assert seen2[0] == "mixed" and seen2[-1] == "prefill", samples
    assert {x["modes"]["1"] for x in samples} == {"mixed"}
    assert all(b["t"] > a["t"] for a, b in zip(samples, samples[1:]))
    strip = {line.split("|")[0].split()[-1]: line.split("|")[1] for line in out.splitlines()
             if line.strip().startswith("rank ") and "|" in line}
    assert set(strip["1"]) == {"m"} and strip["2"].startswith("m") and strip["2"].endswith("P"), out


@pytest.mark.parametrize("leave_after_s", [0.0, 0.05])
def test_a_client_gone_during_a_flip_frees_every_block_once(tiny_dir: Path, leave_after_s: float) -> None:
    """A long answer decodes on rank R; R is set to prefill and the client leaves at once or
    50 ms later, racing the move (MigrateOut, Paused, Reserve, SendKV): whatever step the abort
    meets, both ranks free what they hold, the flip completes, and the server serves on."""
    async def race(url: str) -> int:
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"prompt": PROMPTS[1], "max_tokens": 450, "ignore_eos": True, "stream": True}
            async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        break  # decoding
                ranks = (await c.get(f"{url}/v1/cluster")).json()["ranks"]
                rank = next(x["rank"] for x in ranks if x["running"])
                resp = await c.post(f"{url}/v1/cluster/mode", json={"rank": rank, "mode": "prefill"})
                assert resp.status_code == 200, resp.text
                await asyncio.sleep(leave_after_s)
            return rank  # the stream closed: the client is gone

    with serving(tiny_dir, "--elastic", "2") as s:
        rank = asyncio.run(race(s.url))
        blocks = wait_blocks_free(s.url)
        assert blocks and all(free == total for free, total in blocks.values()), blocks
        deadline = time.monotonic() + 10
        while metric_values(s.url, "pd_local_flip_seconds_count").get('{to="prefill"}') != 1.0:
            assert time.monotonic() < deadline, metric_values(s.url, "pd_local_flip_seconds_count")
            time.sleep(0.05)
        assert metric_values(s.url, "pd_local_requests_in_flight")[""] == 0
        assert metric_values(s.url, "pd_local_requests_total")['{outcome="abort"}'] == 1
        view = httpx.get(f"{s.url}/v1/cluster", timeout=10).json()
        assert view["ranks"][rank - 1]["mode"] == "prefill" and all(x["running"] == 0 for x in view["ranks"])
        assert asyncio.run(complete_all(s.url)) == reference_texts(tiny_dir)  # serves on, correctly
