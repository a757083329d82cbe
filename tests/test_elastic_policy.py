"""The mode policy end to end: real torchrun elastic workers, real HTTP. A load of both kinds of
work makes the policy (not the operator) flip a rank to mostly-prefill, and the flip shows in the
work the ranks do afterwards, in the metrics and in the log, with the text unchanged."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_tiny_hf_model
from tests.server_utils import metric_values, serving

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

# Fast policy times, so a split is measured, confirmed and applied within a few seconds.
FAST = ["--set", "modes.rate_tau_s=1", "--set", "modes.confirm_s=0.5", "--set", "modes.dwell_s=3"]
TARGET = 0.35  # busy ranks of each kind the load aims at: a share of 0.5, each side within a rank
LONG_PROMPT = [1 + (11 * j) % 397 for j in range(440)]
ANSWER = {"prompt": [5, 6, 7, 8], "max_tokens": 48, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("policy"), tokenizer_dir=smollm2_dir,
                              num_layers=3, seed=3)


async def drive_until_split(url: str, limit_s: float = 60) -> tuple[dict, list[dict]]:
    """Long prompts and long answers, each paced on the demand the server measures (so the mix
    is both kinds whatever the CPU's speed), until a rank is mostly-prefill: /v1/cluster then."""
    async with httpx.AsyncClient(timeout=120) as c:
        answers: list[asyncio.Task[httpx.Response]] = []
        prompts: list[asyncio.Task[httpx.Response]] = []
        deadline = time.monotonic() + limit_s
        while True:
            cluster = (await c.get(f"{url}/v1/cluster")).json()
            if any(r["mode"] == "prefill" for r in cluster["ranks"]):
                break
            assert time.monotonic() < deadline, f"no policy flip in {limit_s} s: {cluster}"
            demand = cluster.get("demand", {"prefill": 0.0, "decode": 0.0})
            if demand["decode"] < TARGET and sum(not t.done() for t in answers) < 2:
                answers.append(asyncio.create_task(c.post(f"{url}/v1/completions", json=ANSWER)))
            if demand["prefill"] < TARGET and all(t.done() for t in prompts):
                body = {"prompt": LONG_PROMPT, "max_tokens": 1}
                prompts.append(asyncio.create_task(c.post(f"{url}/v1/completions", json=body)))
            await asyncio.sleep(0.1)
        done = [r.json() for r in await asyncio.gather(*answers, *prompts)]
        return cluster, done


async def decode_ranks_now(url: str, n: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as c:
        return [r.json() for r in await asyncio.gather(
            *[c.post(f"{url}/v1/completions", json=ANSWER) for _ in range(n)])]


def test_a_load_of_both_kinds_makes_the_policy_split_the_ranks_and_the_work_follows(tiny_dir: Path) -> None:
    with serving(tiny_dir, "--elastic", "2", *FAST) as s:
        cluster, done = asyncio.run(drive_until_split(s.url))
        assert cluster["mode_control"] == "policy"
        modes = {r["rank"]: r["mode"] for r in cluster["ranks"]}
        assert sorted(modes.values()) == ["decode", "prefill"], modes
        prefiller = next(k for k, m in modes.items() if m == "prefill")
        decoder = 3 - prefiller
        share = cluster["demand"]["prefill"] / (cluster["demand"]["prefill"] + cluster["demand"]["decode"])
        assert 0.15 <= share <= 0.85, cluster["demand"]  # the split's own bounds
        assert metric_values(s.url, "pd_local_flips_total") == {'{to="decode"}': 1.0, '{to="prefill"}': 1.0}
        assert set(metric_values(s.url, "pd_local_mode_demand")) == {'{work="decode"}', '{work="prefill"}'}
        texts = {b["choices"][0]["text"] for b in done if b["usage"]["completion_tokens"] == 48}
        # the work follows the modes: new answers decode on the mostly-decode rank (within the
        # dwell the modes cannot change back), with the same text as before the flip
        after = asyncio.run(decode_ranks_now(s.url, 2))
        assert [b["pd_local"]["decode_rank"] for b in after] == [decoder] * 2, [b["pd_local"] for b in after]
        assert {b["choices"][0]["text"] for b in after} | texts == texts and len(texts) == 1
        assert all("error" not in b for b in done)
        os.kill(s.rank_pid(0), signal.SIGINT)
        rc, out = s.wait(timeout=60)
        assert rc == 0, out[-4000:]
        assert f"rank {prefiller} -> prefill: demand " in out, out[-4000:]  # one log line, its reason
