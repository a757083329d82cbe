"""Prefix caching through real torchrun ranks (tiny random Llama, HTTP, chat endpoint): multi-turn
conversations whose every turn resends the whole history (answers included) give the same text
with the cache on and off in every topology; in PD the decode rank's hits cut the KV bytes that
cross the link; a client that vanishes while a turn relying on cached blocks is being prefilled
and sent leaves every block free and the cache intact."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_tiny_hf_model
from tests.server_utils import metric_values, serving

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

SYSTEM = ("You are the help desk of a lighthouse museum. Answer briefly. " * 6).strip()
QUESTIONS = [["Where is the lens?", "How tall is the tower?", "Can I climb it?"],
             ["Who was the last keeper?", "Did he live here?", "Is there a shop?"]]
MAX_TOKENS = 12
OFF = ("--set", "engine.enable_prefix_caching=false")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("prefixcache"), tokenizer_dir=smollm2_dir,
                              num_layers=3, seed=5)


async def _chat(c: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
                usage: list[dict] | None = None) -> str:
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    r = await c.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if usage is not None:
        usage.append(r.json()["usage"])
    return r.json()["choices"][0]["message"]["content"]


async def converse(url: str, usage: list[dict] | None = None) -> tuple[list[list[str]], list[float]]:
    """Both conversations turn by turn (their turns in flight together); the answers, and the
    KV bytes moved during each turn. `usage` collects each response's usage, turn by turn."""
    histories = [[{"role": "system", "content": SYSTEM}] for _ in QUESTIONS]
    answers: list[list[str]] = [[] for _ in QUESTIONS]
    moved = []
    async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
        for turn in range(len(QUESTIONS[0])):
            before = sum(metric_values(url, "pd_local_kv_transfer_bytes_total").values())
            for h, qs in zip(histories, QUESTIONS):
                h.append({"role": "user", "content": qs[turn]})
            got = await asyncio.gather(*[_chat(c, url, h, usage) for h in histories])
            for h, a, text in zip(histories, answers, got):
                h.append({"role": "assistant", "content": text})
                a.append(text)
            moved.append(sum(metric_values(url, "pd_local_kv_transfer_bytes_total").values()) - before)
    return answers, moved


def decode_hits(url: str) -> float:
    return sum(v for k, v in metric_values(url, "pd_local_prefix_cache_hit_tokens_total").items()
               if 'role="prefill"' not in k)


@pytest.fixture(scope="module")
def cache_off(tiny_dir: Path) -> tuple[list[list[str]], list[float], list[dict]]:
    """What every topology with the cache on is held to: 1P1D with the cache off. Its texts and
    the KV bytes each turn moves (whole prompts) do not depend on the topology, so one server
    serves all four."""
    usage: list[dict] = []
    with serving(tiny_dir, "--prefill", "1", "--decode", "1", "--set", "engine.max_prefill_tokens=32",
                 *OFF) as s:
        off, moved = asyncio.run(converse(s.url, usage))
        assert decode_hits(s.url) == 0
    return off, moved, usage


@pytest.mark.parametrize("flags", [
    ("--colocated", "2"),
    ("--prefill", "1", "--decode", "1"),
    ("--prefill", "1", "--decode", "2", "--routing", "prefix"),
    ("--prefill", "2", "--decode", "1"),
], ids=["colocated-2", "1P1D", "1P2D-prefix", "2P1D"])
def test_multi_turn_text_is_identical_with_the_cache_on_and_off(
        tiny_dir: Path, flags: tuple[str, ...], cache_off: tuple[list[list[str]], list[float], list[dict]]) -> None:
    pd = "--prefill" in flags
    extra = ("--set", "engine.max_prefill_tokens=32") if pd else ()  # prefill ranks chunk too
    usage_on: list[dict] = []
    with serving(tiny_dir, *flags, *extra) as s:
        on, moved_on = asyncio.run(converse(s.url, usage_on))
        hits = decode_hits(s.url)
    off, moved_off, usage_off = cache_off
    assert on == off
    assert hits > 0, "turns 2 and 3 must hit the system prompt and the earlier turns"
    # usage.prompt_tokens_details.cached_tokens: what the prefix cache (colocated: the engine's;
    # PD: the prefill rank's) spared computing; whole blocks, never the last prompt token
    cached_on = [u["prompt_tokens_details"]["cached_tokens"] for u in usage_on]
    assert all(n % 16 == 0 and 0 <= n < u["prompt_tokens"] for n, u in zip(cached_on, usage_on))
    assert sum(cached_on[len(QUESTIONS):]) > 0, cached_on  # later turns hit (whichever rank)
    assert all(u["prompt_tokens_details"]["cached_tokens"] == 0 for u in usage_off)
    if pd:
        assert moved_on[0] == moved_off[0]  # turn 1: nothing cached yet on the decode side...
        for turn in (1, 2):  # ... later turns move only what the decode rank lacks
            assert moved_on[turn] < 0.5 * moved_off[turn], (moved_on, moved_off)


def test_a_client_gone_mid_transfer_of_a_cached_turn_frees_every_block(tiny_dir: Path) -> None:
    """Turn 2 reuses turn 1's blocks on the decode rank; its long new part is prefilled in
    16-token chunks. Clients vanish at staggered moments (queued, mid-prefill, mid-transfer,
    decoding); afterwards every decode block is free and the same turn 2 still gives the text of
    a server that never saw the aborts."""
    long_question = "Tell me everything about the lens, the lamp and the keepers. " * 12
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    flags = ("--prefill", "1", "--decode", "1", "--set", "engine.max_prefill_tokens=16")

    async def scenario(url: str, abort: bool) -> str:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
            first = await _chat(c, url, turn1)
            turn2 = turn1 + [{"role": "assistant", "content": first},
                             {"role": "user", "content": long_question}]
            if abort:
                for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
                    task = asyncio.create_task(_chat(c, url, turn2))
                    await asyncio.sleep(delay)
                    task.cancel()  # closes the connection: the server aborts the request
                    await asyncio.gather(task, return_exceptions=True)
            return await _chat(c, url, turn2)

    with serving(tiny_dir, *flags) as s:
        ref = asyncio.run(scenario(s.url, abort=False))
    with serving(tiny_dir, *flags) as s:
        got = asyncio.run(scenario(s.url, abort=True))
        hits = decode_hits(s.url)
        deadline = time.monotonic() + 20  # the last aborts may still be reaching the ranks
        while True:
            free = metric_values(s.url, "pd_local_kv_blocks_free")
            total = metric_values(s.url, "pd_local_kv_blocks_total")
            decode = {k: v for k, v in free.items() if 'role="decode"' in k}
            if all(v == total[k] for k, v in decode.items()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        in_flight = metric_values(s.url, "pd_local_requests_in_flight")
    assert got == ref
    assert hits > 0
    assert decode and all(v == total[k] for k, v in decode.items()), (free, total)
    assert in_flight.get("", 0) == 0
