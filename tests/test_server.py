"""The HTTP front-end end to end: real uvicorn, real SSE, the real SmolLM2 behind it.

The shared tests run twice: against an in-process engine backend, and against a real
`pd-local serve` world (torchrun: router on rank 0, one prefill rank, one decode rank)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from pd_local.config import EngineConfig
from tests.server_utils import inprocess_server, metric_values, serving, wait_healthy

pytestmark = pytest.mark.slow

CHAT = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Name three colors."}],
        "max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module", params=["inprocess", "torchrun-1p1d"])
def url(request: pytest.FixtureRequest, smollm2_dir: Path) -> Iterator[str]:
    if request.param == "inprocess":
        with inprocess_server(smollm2_dir, EngineConfig(kv_cache_gb=0.1, max_num_seqs=64), max_queue=64) as u:
            wait_healthy(u)
            yield u
    else:
        with serving(smollm2_dir, "--prefill", "1", "--decode", "1", "--set", "engine.max_num_seqs=64") as s:
            yield s.url


BACKENDS = ["inprocess", "torchrun-1p1d"]


@contextlib.contextmanager
def server_of(kind: str, model_dir: Path, max_queue: int | None = None, api_key: str | None = None,
              max_model_len: int | None = None) -> Iterator[str]:
    """A fresh server of either kind with these settings; yields its URL."""
    if kind == "inprocess":
        settings: dict[str, object] = {}
        if max_queue is not None:
            settings["max_queue"] = max_queue
        if api_key is not None:
            settings["api_key"] = api_key
        with inprocess_server(model_dir, EngineConfig(kv_cache_gb=0.05, max_model_len=max_model_len), **settings) as u:
            wait_healthy(u)
            yield u
        return
    flags = ["--prefill", "1", "--decode", "1"]
    if max_queue is not None:
        flags += ["--set", f"server.max_queue={max_queue}"]
    if api_key is not None:
        flags += ["--api-key", api_key]
    if max_model_len is not None:
        flags += ["--set", f"engine.max_model_len={max_model_len}"]
    with serving(model_dir, *flags) as srv:
        yield srv.url


def sse_chunks(resp: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_streaming_chat_wire_format(url: str) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(r)
    assert chunks[-1] == "[DONE]"
    objs = [c for c in chunks if isinstance(c, dict)]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == objs[0]["id"] for c in objs)
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = [c for c in objs if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = objs[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    timings = usage["pd_local"]["timings_ms"]
    assert {"prefill", "decode", "ttft", "total"} <= set(timings) and timings["total"] >= timings["ttft"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in objs if c["choices"])
    whole = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["content"] == text  # greedy: same text either way
    assert whole["usage"]["completion_tokens"] == usage["usage"]["completion_tokens"]
    # the same prompt again: its full blocks come from the prefix cache (never the last token)
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] % 16 == 0
    cached = whole["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached % 16 == 0 and 0 < cached < whole["usage"]["prompt_tokens"], whole["usage"]


def test_cluster_view_counts_exactly_what_a_response_reports(url: str) -> None:
    """The in-process backend and the router alike: the response names its ranks, and the
    /v1/cluster token counters grow by exactly its computed prompt and completion tokens."""
    def ranks() -> dict[int, dict]:
        deadline = time.monotonic() + 30
        while True:  # nothing of an earlier test still in flight
            c = httpx.get(f"{url}/v1/cluster", timeout=10).json()
            if c["in_flight"] == 0 or time.monotonic() > deadline:
                return {r["rank"]: r for r in c["ranks"]}
            time.sleep(0.1)

    before = ranks()
    body = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "prompt": "The three primary colours are", "max_tokens": 7, "ignore_eos": True,
        "temperature": 0}).json()
    after = ranks()
    ext, usage = body["pd_local"], body["usage"]
    roles = {r: after[r]["role"] for r in after}
    assert roles[ext["decode_rank"]] in ("decode", "colocated")
    assert roles[ext["prefill_rank"]] in ("prefill", "colocated")

    def grew(key: str) -> int:
        return sum(after[r][key] - before[r][key] for r in after)
    assert grew("generated_tokens") == usage["completion_tokens"] == 7
    computed = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert grew("prefilled_tokens") == computed > 0
    assert after[ext["prefill_rank"]]["prefilled_tokens"] - before[ext["prefill_rank"]]["prefilled_tokens"] == computed


def test_one_token_answers_report_their_prefix_hit(url: str) -> None:
    """max_tokens=1 finishes on the first token. In 1P1D that token comes from the decode rank
    and can reach the router before the prefill rank's PrefillDone: the hit must travel with it
    (it once reported 0 whenever the token won that race)."""
    body = {"model": CHAT["model"], "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "In one word: what colour is a ripe lemon? " * 3}]}
    first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["usage"]
    assert first["completion_tokens"] == 1
    for _ in range(3):
        usage = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert usage["completion_tokens"] == 1 and usage["prompt_tokens"] == first["prompt_tokens"]
        assert cached % 16 == 0 and 0 < cached < usage["prompt_tokens"], usage


def test_greedy_text_matches_offline_generate(url: str, smollm2_dir: Path) -> None:
    import torch

    from pd_local.engine.engine import Engine
    from pd_local.cli.generate import run_batch
    from pd_local.model.weights import load_model
    from pd_local.api.openai_request import parse_request
    from pd_local.tokenizer import Tokenizer

    bodies = [
        {**CHAT, "max_tokens": 40},
        {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 30, "temperature": 0, "stop": ["5"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
         "max_tokens": 48, "temperature": 0.8, "seed": 7},
    ]
    model, _ = load_model(smollm2_dir, torch.bfloat16)
    tok = Tokenizer.from_dir(smollm2_dir)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.05), stop_token_ids=tok.stop_token_ids)
    reqs = {i: parse_request(b, "chat", tok, engine.max_model_len) for i, b in enumerate(bodies)}
    offline = run_batch(engine, tok, reqs)
    for i, b in enumerate(bodies):
        got = httpx.post(f"{url}/v1/chat/completions", json=b, timeout=60).json()
        assert got["choices"][0]["message"]["content"] == offline[i]["text"], b
        assert got["choices"][0]["finish_reason"] == offline[i]["finish_reason"]


def test_messages_and_fields_as_clients_send_them_give_the_plain_requests_text(url: str) -> None:
    """Text parts, the developer role, `name`, response_format text and sampling fields at their
    neutral values: the same tokens as the plain request (guidellm and newer OpenAI clients)."""
    plain = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Name a colour.\nThen a fruit."}],
             "max_tokens": 12, "temperature": 0}
    sent = {**plain, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Name a colour."},
                                                    {"type": "text", "text": "Then a fruit."}]}],
        "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
        "repetition_penalty": 1, "min_p": 0, "min_tokens": 0, "stop_token_ids": [], "user": "u1",
        "metadata": {"team": "a"}, "service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "s"}
    a, b = (httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60) for body in (plain, sent))
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
    ua, ub = a.json()["usage"], b.json()["usage"]  # (the second may hit the prefix cache)
    assert (ua["prompt_tokens"], ua["completion_tokens"]) == (ub["prompt_tokens"], ub["completion_tokens"])


def test_openai_client_streaming_and_not(url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT["messages"], max_tokens=16,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    whole = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT["messages"], max_tokens=16, temperature=0)
    assert "".join(parts) == whole.choices[0].message.content and parts
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    comp = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text and comp.object == "text_completion"
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    card = client.models.retrieve("smollm2-135m-instruct")
    assert card.id == "smollm2-135m-instruct" and card.created == client.models.list().data[0].created
    assert 0 < time.time() - card.created < 3600  # the server's start time
    r = httpx.get(f"{url}/v1/models/gpt-9", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_a_batch_of_prompts_gives_each_prompts_own_completion(url: str) -> None:
    """/v1/completions with a list of prompts (lm-eval's local-completions with batch_size > 1):
    choice i is what prompt i alone gives, strings and token-id lists alike; usage sums them."""
    prompts = ["The capital of France is", "Two plus two equals", "A haiku about rain:"]
    common = {"max_tokens": 8, "temperature": 0}
    alone = [httpx.post(f"{url}/v1/completions", json={**common, "prompt": p}, timeout=60).json()
             for p in prompts]
    batch = httpx.post(f"{url}/v1/completions", json={**common, "prompt": prompts}, timeout=60).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    assert [c["text"] for c in batch["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert batch["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert batch["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert len(batch["pd_local"]["choices"]) == 3
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    by_ids = httpx.post(f"{url}/v1/completions", json={**common, "prompt": ids}, timeout=60).json()
    one = httpx.post(f"{url}/v1/completions", json={**common, "prompt": ids[1]}, timeout=60).json()
    assert by_ids["choices"][1]["text"] == one["choices"][0]["text"]
    # streamed: one stream, every chunk naming its prompt's index, each index's text as alone
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={**common, "prompt": prompts, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        chunks = sse_chunks(r)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"] == batch["usage"] and len(usage["pd_local"]["choices"]) == 3
    body = [c for c in chunks[:-2] if isinstance(c, dict)]
    assert len({c["id"] for c in body} | {usage["id"]}) == 1
    texts = ["".join(c["choices"][0]["text"] for c in body if c["choices"][0]["index"] == i) for i in range(3)]
    assert texts == [a["choices"][0]["text"] for a in alone]
    finishes = [c["choices"][0]["index"] for c in body if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]


@pytest.mark.parametrize("stream", [False, True])
def test_every_finish_reports_its_timings(url: str, stream: bool) -> None:
    """pd_local.timings_ms on a stop string (which ends the request before the ranks do), on
    `length` and on EOS alike."""
    bodies = {"stop string": {"messages": [{"role": "user", "content": "Count to ten."}], "stop": ["3"]},
              "length": {**CHAT, "max_tokens": 3},
              "eos": {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 200}}
    for why, body in bodies.items():
        body = {**body, "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                events = [json.loads(line[5:]) for line in r.iter_lines()
                          if line.startswith("data:") and line != "data: [DONE]"]
            ext = events[-1]["pd_local"]
        else:
            ext = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["pd_local"]
        t = ext["timings_ms"]
        assert {"ttft", "total"} <= set(t) and 0 < t["ttft"] <= t["total"], (why, ext)
        assert ext["decode_rank"] is not None, (why, ext)


BAD = [
    ("malformed json", b"{not json", 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("missing messages", {"model": "smollm2-135m-instruct"}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("non-string content", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("unknown model", {**CHAT, "model": "gpt-9"}, 404, "model"),
    ("negative max_tokens", {**CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ("absurd max_tokens", {**CHAT, "max_tokens": 10**12}, 400, "max_tokens"),
    ("string temperature", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("n = 0", {**CHAT, "n": 0}, 400, "n"),
    ("top_logprobs without logprobs", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("tools", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("presence_penalty out of range", {**CHAT, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("xml response_format", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("store", {**CHAT, "store": True}, 400, "store"),
    ("verbosity", {**CHAT, "verbosity": "low"}, 400, "verbosity"),
    ("service_tier flex", {**CHAT, "service_tier": "flex"}, 400, "service_tier"),
    ("metadata not strings", {**CHAT, "metadata": {"a": 1}}, 400, "metadata"),
    ("user not a string", {**CHAT, "user": 5}, 400, "user"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages"),
    ("bad stop", {**CHAT, "stop": 7}, 400, "stop"),
    ("too long prompt", {"messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "messages"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_status_and_openai_error_body(url: str, name: str, body: object, status: int, param: str | None) -> None:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/chat/completions", headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if name == "too long prompt":
        import re

        m = re.search(r"prompt has (\d+) tokens but the context is (\d+) tokens", err["message"])
        assert m and int(m.group(1)) > int(m.group(2)) and err["code"] == "context_length_exceeded"
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("kind", BACKENDS)
def test_max_tokens_past_context_is_clipped_to_length(kind: str, smollm2_dir: Path) -> None:
    with server_of(kind, smollm2_dir, max_model_len=64) as u:
        r = httpx.post(f"{u}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 5000, "temperature": 0, "ignore_eos": True})
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["total_tokens"] == 64


def test_body_over_the_limit_is_413(smollm2_dir: Path) -> None:
    with inprocess_server(smollm2_dir, max_body_bytes=1000) as u:
        r = httpx.post(f"{u}/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.get(f"{u}/health").status_code == 200


@pytest.mark.parametrize("kind", BACKENDS)
def test_api_key_required_except_health(kind: str, smollm2_dir: Path) -> None:
    with server_of(kind, smollm2_dir, api_key="s3cret") as u:
        assert httpx.get(f"{u}/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{u}{path}").status_code == 401
            assert httpx.get(f"{u}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(f"{u}{path}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = httpx.post(f"{u}/v1/chat/completions", json=CHAT)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(f"{u}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert r.status_code == 200


@pytest.mark.parametrize("kind", BACKENDS)
def test_overload_gets_429_with_retry_after(kind: str, smollm2_dir: Path) -> None:
    async def run(u: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            body = {**CHAT, "max_tokens": 24, "ignore_eos": True}
            return await asyncio.gather(*[c.post(f"{u}/v1/chat/completions", json=body) for _ in range(8)])

    with server_of(kind, smollm2_dir, max_queue=2) as u:
        rs = asyncio.run(run(u))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 429 in codes
        rejected = [r for r in rs if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in rejected)
        assert metric_values(u, "pd_local_requests_total")['{outcome="rejected"}'] == len(rejected)


def test_fifty_clients_disconnecting_mid_stream_free_every_block(url: str) -> None:
    rng = random.Random(0)

    async def client(c: httpx.AsyncClient, stop_after: int) -> int:
        body = {**CHAT, "max_tokens": 64, "ignore_eos": True, "stream": True}
        seen = 0
        async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= stop_after:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[client(c, rng.randint(1, 20)) for _ in range(50)])

    before = metric_values(url, "pd_local_client_disconnects_total")[""]
    asyncio.run(run())
    t_end = time.monotonic() + 30
    while time.monotonic() < t_end:
        free = metric_values(url, "pd_local_kv_blocks_free")
        total = metric_values(url, "pd_local_kv_blocks_total")
        queued = metric_values(url, "pd_local_prefill_queued_tokens")  # colocated too: its own prompts
        if free == total and metric_values(url, "pd_local_requests_in_flight")[""] == 0 \
                and set(queued.values()) == {0.0}:
            break
        time.sleep(0.2)
    assert free == total, (free, total)
    assert set(queued.values()) == {0.0}, queued
    assert metric_values(url, "pd_local_client_disconnects_total")[""] - before == 50
    assert httpx.get(f"{url}/health").status_code == 200


def test_chat_cli_streams_and_keeps_history(url: str) -> None:
    import argparse
    import io

    from pd_local.cli.chat import run

    args = argparse.Namespace(url=url, model=None, system="Answer in one short sentence.", max_tokens=24,
                              temperature=0.0, seed=None, api_key=None, timings=True)
    out = io.StringIO()
    assert run(args, stdin=io.StringIO("What is the capital of France?\n/reset\nAnd of Italy?\n/quit\n"), stdout=out) == 0
    text = out.getvalue()
    assert "Paris" in text and "(history cleared)" in text and "ttft" in text


def test_chat_cli_reports_an_unreachable_server() -> None:
    import argparse
    import io

    from pd_local.cli.chat import run
    from tests.server_utils import free_port

    args = argparse.Namespace(url=f"http://127.0.0.1:{free_port()}", model=None, system=None, max_tokens=8,
                              temperature=0.0, seed=None, api_key=None, timings=False)
    assert run(args, stdin=io.StringIO("hi\n"), stdout=io.StringIO()) == 1


def test_modes_are_refused_where_no_worker_is_elastic(url: str) -> None:
    """POST /v1/cluster/mode: a 400 naming the topology on colocated and PD servers, and one
    naming the expected body for a malformed one."""
    r = httpx.post(f"{url}/v1/cluster/mode", json={"rank": 1, "mode": "prefill"}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_mode" and "elastic workers (serve --elastic N)" in err["message"]
    assert ("1P1D" in err["message"]) or ("colocated" in err["message"]), err
    for bad in ({"rank": "1", "mode": "prefill"}, {"rank": 1}, [1, "prefill"], {"rank": True, "mode": "mixed"}):
        r = httpx.post(f"{url}/v1/cluster/mode", json=bad, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", (bad, r.text)
    assert "cluster" == httpx.get(f"{url}/v1/cluster", timeout=10).json()["object"]
    assert "mode_control" not in httpx.get(f"{url}/v1/cluster", timeout=10).json()


def test_a_mode_change_the_router_never_answers_is_a_503(smollm2_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The router thread applies mode changes; once it has stopped (here: shut down under a
    live HTTP server), POST /v1/cluster/mode answers 503 after MODE_ANSWER_S, not never."""
    from pd_local.api import server as server_module

    monkeypatch.setattr(server_module, "MODE_ANSWER_S", 0.5)
    worlds: list = []
    with inprocess_server(smollm2_dir, worlds=worlds) as u:
        wait_healthy(u)
        router = worlds[0].router
        router.shutdown()
        assert router.stopped.is_set()
        t0 = time.monotonic()
        r = httpx.post(f"{u}/v1/cluster/mode", json={"rank": 1, "mode": "prefill"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        assert "the router did not apply the mode within 0.5 s" in r.json()["error"]["message"]
        assert 0.4 < time.monotonic() - t0 < 5
