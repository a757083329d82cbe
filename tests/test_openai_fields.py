"""OpenAI fields as clients send them, over HTTP, float32 SmolLM2 in every topology, against
transformers: completions' `logprobs` + `echo` (also `max_tokens: 0` and a batch of prompts, as
lm-eval sends them), chat's `logprobs` / `top_logprobs`, streamed and whole; the sampling
fields (penalties, logit bias, min_tokens, min_p, stop_token_ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch

from pd_local.config import EngineConfig
from pd_local.tokenizer import Tokenizer
from tests.server_utils import inprocess_server, serving, wait_healthy

pytestmark = pytest.mark.slow

TOL = 1e-4
PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]
CHAT = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 6, "temperature": 0}
TOPOLOGIES = {  # the PD ones with both prefill paths: chunked, and whole prompts
    "inprocess": None,
    "colocated-1": ["--colocated", "1"],
    "1P1D": ["--prefill", "1", "--decode", "1"],
    "1P2D-whole-unchunked": ["--prefill", "1", "--decode", "2", "--transfer", "whole",
                             "--set", "engine.chunked_prefill=false"],
}


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def url(request: pytest.FixtureRequest, smollm2_f32_dir: Path) -> Iterator[str]:
    flags = TOPOLOGIES[request.param]
    if flags is None:
        with inprocess_server(smollm2_f32_dir, EngineConfig(kv_cache_gb=0.1, max_prefill_tokens=16),
                              torch.float32) as u:
            wait_healthy(u)
            yield u
    else:  # chunks of 16 tokens: prompt logprobs cross chunk boundaries
        with serving(smollm2_f32_dir, "--dtype", "float32", "--set", "engine.max_prefill_tokens=16",
                     *flags) as s:
            yield s.url


@pytest.fixture(scope="module")
def hf(smollm2_f32_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_f32_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(smollm2_f32_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_f32_dir)


def ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [len, V]


def greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (the server's equals it: test_smollm2_parity)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def post(url: str, route: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/{route}", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url: str, route: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{url}/v1/{route}", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def check_completion(choice: dict, ids: list[int], ref: torch.Tensor, tok: Tokenizer, k: int,
                     n_prompt: int) -> None:
    """choice.logprobs covers ids (the echoed prompt's n_prompt, then the completion's): each
    value is transformers' (the first prompt token has none), each top dict holds the top k."""
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.token_text(i) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for j in range(1, len(ids)):
        row = ref[j - 1]
        assert abs(lp["token_logprobs"][j] - row[ids[j]].item()) < TOL, j
        want = {tok.token_text(i): row[i].item() for i in torch.topk(row, k).indices.tolist()}
        top = lp["top_logprobs"][j]
        assert set(want) <= set(top) and len(top) <= k + 1
        assert max(abs(top[t] - v) for t, v in want.items()) < TOL
        if j >= n_prompt:  # greedy: the completion's tokens are their own top entry
            assert lp["token_logprobs"][j] == max(top.values())
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_completions_echo_and_logprobs_equal_transformers(url: str, hf, tok: Tokenizer) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logprobs": 3, "echo": True}
    got = post(url, "completions", body)
    choice = got["choices"][0]
    prompt = tok.encode(PROMPTS[0])
    assert choice["text"].startswith(PROMPTS[0]) and got["usage"]["completion_tokens"] == 4
    ids = prompt + greedy(hf, prompt, 4)
    check_completion(choice, ids, ref_logprobs(hf, ids), tok, 3, len(prompt))

    # streamed: the same tokens and logprobs, the prompt in the first chunk
    chunks = stream(url, "completions", body)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert texts[0].startswith(PROMPTS[0]) and "".join(texts) == choice["text"]
    merged = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for m in merged for x in m[key]] == choice["logprobs"][key], key


def test_scoring_a_batch_of_prompts_as_lm_eval_does(url: str, hf, tok: Tokenizer) -> None:
    """lm-eval's loglikelihood request: token-id prompts, max_tokens 0 (or 1), echo, logprobs 1."""
    prompts = [tok.encode(p) for p in PROMPTS]
    got = post(url, "completions", {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                                    "temperature": 0})
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert got["usage"]["completion_tokens"] == 0
    for choice, ids in zip(got["choices"], prompts):
        assert choice["finish_reason"] == "length" and choice["text"] == tok.decode(ids, skip_special_tokens=False)
        assert len(choice["logprobs"]["tokens"]) == len(ids)
        check_completion(choice, ids, ref_logprobs(hf, ids), tok, 1, len(ids))
    one = post(url, "completions", {"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1,
                                    "temperature": 0})
    for a, b in zip(one["choices"], got["choices"]):  # the same prompt scores, one token more
        assert a["logprobs"]["token_logprobs"][:-1] == b["logprobs"]["token_logprobs"]


def test_chat_logprobs_equal_transformers_streamed_or_not(url: str, hf, tok: Tokenizer) -> None:
    body = {**CHAT, "logprobs": True, "top_logprobs": 5}
    choice = post(url, "chat/completions", body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    assert all(bytes(c["bytes"]).decode("utf-8", errors="replace") == c["token"] for c in content)
    prompt = tok.encode_chat(CHAT["messages"])
    out = greedy(hf, prompt, 6)
    assert [c["token"] for c in content] == [tok.token_text(i) for i in out]
    ref = ref_logprobs(hf, prompt + out)
    for j, c in enumerate(content):
        row = ref[len(prompt) - 1 + j]
        assert abs(c["logprob"] - row[out[j]].item()) < TOL
        assert [t["token"] for t in c["top_logprobs"]] == [tok.token_text(i) for i in torch.topk(row, 5).indices.tolist()]
        assert c["top_logprobs"][0]["token"] == c["token"]
    chunks = stream(url, "chat/completions", body)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = post(url, "chat/completions", {**CHAT, "logprobs": True})["choices"][0]
    assert [c["top_logprobs"] for c in plain["logprobs"]["content"]] == [[]] * 6
    assert post(url, "chat/completions", CHAT)["choices"][0]["logprobs"] is None


BAD = [
    ("chat/completions", {**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
    ("chat/completions", {**CHAT, "frequency_penalty": "high"}, "frequency_penalty"),
    ("chat/completions", {**CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ("chat/completions", {**CHAT, "min_tokens": 7}, "min_tokens"),  # past max_tokens
    ("chat/completions", {**CHAT, "min_p": 1.5}, "min_p"),
    ("chat/completions", {**CHAT, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("chat/completions", {**CHAT, "logit_bias": {"cat": 3}}, "logit_bias"),
    ("chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias"),
    ("chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {**CHAT, "echo": True}, "echo"),
    ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": "hi", "top_logprobs": 2}, "top_logprobs"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("route,body,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_logprobs_fields_are_refused_naming_them(url: str, route: str, body: dict, param: str) -> None:
    r = httpx.post(f"{url}/v1/{route}", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_offline_generate_refuses_logprobs_naming_them(smollm2_f32_dir: Path, tmp_path: Path) -> None:
    """`pd-local generate` writes text only: a line asking logprobs gets an error, not text without them."""
    from pd_local.cli.generate import main

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({**CHAT, "logprobs": True}) + "\n" + json.dumps(CHAT) + "\n")
    assert main(["--model", str(smollm2_f32_dir), "--input", str(src), "--output", str(dst)]) == 0
    first, second = [json.loads(line) for line in dst.read_text().splitlines()]
    assert first["error"]["param"] == "logprobs" and "HTTP API" in first["error"]["message"]
    assert second["text"] and "error" not in second


@pytest.fixture(scope="module")
def engine(smollm2_f32_dir: Path, tok: Tokenizer):
    from pd_local.engine.engine import Engine
    from pd_local.model.weights import load_model

    return Engine(load_model(smollm2_f32_dir, torch.float32)[0], EngineConfig(kv_cache_gb=0.1),
                  stop_token_ids=tok.stop_token_ids)


def test_sampling_fields_do_what_they_say_in_every_topology(url: str, hf, tok: Tokenizer, engine) -> None:
    """Greedy with repetition_penalty equals transformers'; neutral values change nothing;
    stop_token_ids, logit_bias and min_tokens act; a seeded sample with every field set gives
    the offline engine's tokens (the same seed gives the same text in any topology)."""
    from pd_local.engine.sampling import SamplingParams

    poem = {"messages": [{"role": "user", "content": "Write a poem about the sea."}], "max_tokens": 16,
            "temperature": 0}
    prompt = tok.encode_chat(poem["messages"])
    plain = post(url, "chat/completions", poem)["choices"][0]["message"]["content"]
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_tokens": 0,
               "min_p": 0, "stop_token_ids": [], "logit_bias": {}}
    assert post(url, "chat/completions", {**poem, **neutral})["choices"][0]["message"]["content"] == plain
    rep = post(url, "chat/completions", {**poem, "repetition_penalty": 1.5})["choices"][0]["message"]["content"]
    assert rep != plain and rep == tok.decode(hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                                          pad_token_id=0, repetition_penalty=1.5)[0, len(prompt):].tolist())
    first = greedy(hf, prompt, 3)
    stopped = post(url, "chat/completions", {**poem, "stop_token_ids": [first[2]]})
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 3
    biased = post(url, "chat/completions", {**poem, "logit_bias": {str(first[0]): -100}})
    assert not biased["choices"][0]["message"]["content"].startswith(tok.decode(first[:1]))
    hi = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 60}
    short = post(url, "chat/completions", hi)["usage"]["completion_tokens"]
    longer = post(url, "chat/completions", {**hi, "min_tokens": short + 4})["usage"]["completion_tokens"]
    assert short < 60 and longer >= short + 4

    fields = {"presence_penalty": 0.4, "frequency_penalty": 0.3, "repetition_penalty": 1.1, "min_p": 0.05,
              "min_tokens": 2, "logit_bias": {"13": 1.5}}
    body = {**poem, "temperature": 0.9, "seed": 5, **fields}
    got = post(url, "chat/completions", body)["choices"][0]["message"]["content"]
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=16, presence_penalty=0.4, frequency_penalty=0.3,
                            repetition_penalty=1.1, min_p=0.05, min_tokens=2, logit_bias_ids=(13,),
                            logit_bias_values=(1.5,))
    assert got == tok.decode(engine.generate([prompt], params)[0][0])


def prefilled(url: str) -> int:
    return sum(r["prefilled_tokens"] for r in httpx.get(f"{url}/v1/cluster", timeout=10).json()["ranks"])


def test_n_choices_are_their_seeds_alone_and_the_prompt_is_prefilled_once(url: str) -> None:
    import uuid

    chat = {"messages": [{"role": "user", "content": f"Invent a name for a cat ({uuid.uuid4().hex[:8]})."}],
            "max_tokens": 8, "temperature": 0.9, "seed": 5}
    before = prefilled(url)
    got = post(url, "chat/completions", {**chat, "n": 3})
    usage = got["usage"]
    assert prefilled(url) - before == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert [c["index"] for c in got["choices"]] == [0, 1, 2] and got["object"] == "chat.completion"
    alone = [post(url, "chat/completions", {**chat, "seed": 5 + i}) for i in range(3)]
    assert [c["message"]["content"] for c in got["choices"]] == [a["choices"][0]["message"]["content"] for a in alone]
    assert usage["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]  # once, not three times
    assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert len(got["pd_local"]["choices"]) == 3

    chunks = stream(url, "chat/completions", {**chat, "n": 3})
    texts = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                     if c["choices"] and c["choices"][0]["index"] == i) for i in range(3)]
    assert texts == [c["message"]["content"] for c in got["choices"]]

    prompts = ["Once upon a time", "The weather today"]
    batch = post(url, "completions", {"prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0.9, "seed": 1})
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        for j in range(2):
            one = post(url, "completions", {"prompt": p, "max_tokens": 6, "temperature": 0.9, "seed": 1 + j})
            assert batch["choices"][2 * i + j]["text"] == one["choices"][0]["text"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "n": 2, "echo": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "n": 65}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}}


def test_response_format_json_gives_json_that_matches_in_every_topology(url: str) -> None:
    ask = {"messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 64}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        got = post(url, "chat/completions", {**ask, **sampling, "response_format": fmt})["choices"][0]
        person = json.loads(got["message"]["content"])
        assert set(person) == {"name", "age"} and isinstance(person["name"], str), person
        assert isinstance(person["age"], int) and got["finish_reason"] == "stop"
    chunks = stream(url, "chat/completions", {**ask, "temperature": 0, "response_format": fmt})
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert json.loads(streamed) == json.loads(post(url, "chat/completions", {**ask, "temperature": 0,
                                                                              "response_format": fmt})
                                              ["choices"][0]["message"]["content"])
    obj = post(url, "completions", {"prompt": "A JSON object describing a cat:", "max_tokens": 48, "temperature": 0,
                                    "response_format": {"type": "json_object"}})["choices"][0]
    if obj["finish_reason"] == "stop":  # a free-form object may outgrow 48 tokens
        assert isinstance(json.loads(obj["text"]), dict)
    assert obj["text"].lstrip().startswith("{")
    for bad in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                {"type": "regex"}, "json"):
        r = httpx.post(f"{url}/v1/chat/completions", json={**ask, "response_format": bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_content_parts_developer_role_and_names_give_the_plain_text(url: str) -> None:
    plain = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Name a colour.\nThen a fruit."}], "max_tokens": 10, "temperature": 0}
    parts = {**plain, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Name a colour."},
                                                    {"type": "text", "text": "Then a fruit."}]}]}
    a, b = (post(url, "chat/completions", body)["choices"][0]["message"]["content"] for body in (plain, parts))
    assert a == b and a
