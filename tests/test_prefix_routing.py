"""`routing = "prefix"` on a real 1P2D server (torchrun ranks, HTTP, tiny random Llama): a
conversation's second turn goes to the decode rank that served its first, and the greedy text is
the same as under `load` routing.

The scenario is built so that `load` routing would split the conversations the other way: turn 2
of B is sent first, onto an idle server (load: the tie-break rank, the one A's turn 1 got), then
turn 2 of A while B's is still running (load: the other rank). Which rank served a request is
read from `pd_local_routed_requests_total{rank, role="decode"}` right after its first token.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_tiny_hf_model
from tests.server_utils import serving

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

BLOCK = 16  # engine.block_size default
SYS_A = [1 + (5 * j) % 300 for j in range(4 * BLOCK)]
SYS_B = [2 + (11 * j) % 300 for j in range(4 * BLOCK)]
TURN1 = {"A": SYS_A + [7 + j for j in range(20)], "B": SYS_B + [9 + j for j in range(20)]}
TURN2 = {k: v + [30 + (3 * j) % 50 for j in range(30)] for k, v in TURN1.items()}
MAX_TOKENS = 120  # long enough that a request is still running when the next one is routed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("prefixroute"), tokenizer_dir=smollm2_dir,
                              num_layers=3, seed=3)


async def _counters(c: httpx.AsyncClient, url: str, name: str) -> dict[int, float]:
    """{decode rank: value} of a per-rank counter."""
    out = {}
    for line in (await c.get(f"{url}/metrics")).text.splitlines():
        if line.startswith(name + "{") and 'role="decode"' in line:
            labels, _, val = line.rpartition(" ")
            out[int(labels.split('rank="')[1].split('"')[0])] = float(val)
    return out


async def _stream(c: httpx.AsyncClient, url: str, prompt: list[int],
                  first: asyncio.Event) -> str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0.0, "stream": True}
    text = []
    async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = json.loads(line[5:])
                text.append(chunk["choices"][0].get("text") or "")
                first.set()
    return "".join(text)


async def _start(c: httpx.AsyncClient, url: str, prompt: list[int]
                 ) -> tuple[asyncio.Task[str], int]:
    """Send a streamed request; once its first token is out, return it and its decode rank."""
    before = await _counters(c, url, "pd_local_routed_requests_total")
    first = asyncio.Event()
    task = asyncio.create_task(_stream(c, url, prompt, first))
    await asyncio.wait_for(first.wait(), 60)
    after = await _counters(c, url, "pd_local_routed_requests_total")
    moved = [r for r in after if after[r] != before.get(r, 0)]
    assert len(moved) == 1 and after[moved[0]] - before.get(moved[0], 0) == 1, (before, after)
    return task, moved[0]


async def conversations(url: str) -> tuple[dict[str, int], dict[str, str], float]:
    """Turn 1 of A then B (overlapping), turn 2 of B then A (overlapping). Returns the decode
    rank and greedy text of each request, and the prompt tokens routed as expected-cached."""
    ranks, texts = {}, {}
    async with httpx.AsyncClient(timeout=120) as c:
        for order, turn in ((("A", "B"), TURN1), (("B", "A"), TURN2)):
            tasks = {}
            for conv in order:
                tasks[conv], ranks[f"{conv}{1 if turn is TURN1 else 2}"] = \
                    await _start(c, url, turn[conv])
            for conv, task in tasks.items():
                texts[f"{conv}{1 if turn is TURN1 else 2}"] = await task
        hit = sum((await _counters(c, url, "pd_local_routed_prefix_tokens_total")).values())
    return ranks, texts, hit


def test_prefix_routing_keeps_each_conversation_on_its_rank_with_load_routings_text(
        tiny_dir: Path) -> None:
    flags = ("--prefill", "1", "--decode", "2")
    with serving(tiny_dir, *flags, "--routing", "prefix") as s:
        ranks, texts, hit = asyncio.run(conversations(s.url))
    assert ranks["A1"] != ranks["B1"], ranks  # the second turn 1 found the first one running
    assert ranks["A2"] == ranks["A1"] and ranks["B2"] == ranks["B1"], ranks
    # each turn 2 matched its turn 1's 84-token prompt: 5 full blocks of 16
    assert hit == 2 * 5 * BLOCK
    with serving(tiny_dir, *flags, "--routing", "load") as s:
        _, load_texts, load_hit = asyncio.run(conversations(s.url))
    assert load_hit == 0
    assert texts == load_texts
