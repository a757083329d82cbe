"""Prefix caching in the engine and the chunked prefiller: multi-turn reuse with logits identical
to no caching, only prefill-computed blocks cached, eviction under pressure, decode ranks that
reserve (and are sent) only what they lack, and exact accounting on abort."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pd_local.engine.engine as engine_mod
from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.scheduler import PrefillChunk
from pd_local.model.llama import LayerKVHook
from pd_local.engine.sampling import SamplingParams
from tests.tiny_models import random_prompts, tiny_model

BS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
REAL_SAMPLE = engine_mod.sample


def engine(model: torch.nn.Module, caching: bool, chunk: int | None = 7, **kw: object) -> Engine:
    cfg: dict[str, object] = dict(num_blocks=256, block_size=BS, max_num_seqs=16,
                                  max_prefill_tokens=chunk or 4096, chunked_prefill=chunk is not None,
                                  enable_prefix_caching=caching)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def run(eng: Engine, prompts: dict[int, list[int]], params: SamplingParams,
        monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
    """Run prompts (req_id -> ids) together to completion; tokens and the logits each token was
    sampled from, per request. The allocator's invariant is checked after every step."""
    seen: dict[int, list[torch.Tensor]] = {}
    rows: list[list[int]] = []
    real_append = eng._append_tokens

    def spy(logits, plist, gens):
        for row, rid in enumerate(rows[-1]):
            seen.setdefault(rid, []).append(logits[row].clone())
        return REAL_SAMPLE(logits, plist, gens)

    def append(seqs, logits):
        rows.append([s.req_id for s in seqs])
        return real_append(seqs, logits)

    with monkeypatch.context() as mp:
        mp.setattr(engine_mod, "sample", spy)
        mp.setattr(eng, "_append_tokens", append)
        for rid, p in prompts.items():
            eng.add_request(rid, p, params)
        toks: dict[int, list[int]] = {rid: [] for rid in prompts}
        while eng.has_unfinished():
            for ev in eng.step():
                toks[ev.req_id].append(ev.token_id)
            eng.allocator.check()
    assert eng.allocator.num_held == 0
    return toks, {rid: torch.stack(v) for rid, v in seen.items()}


def converse(eng: Engine, system: list[int], users: list[list[list[int]]],
             monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict[int, list[int]]], list[dict[int, torch.Tensor]]]:
    """users[turn][conv]: every conversation's turn runs together; each turn's prompt is the
    whole history (system, earlier user turns and answers) plus the new user turn."""
    history = [list(system) for _ in users[0]]
    answers, logits = [], []
    for turn, msgs in enumerate(users):
        prompts = {100 * turn + c: history[c] + m for c, m in enumerate(msgs)}
        toks, lg = run(eng, prompts, GREEDY, monkeypatch)
        for c, m in enumerate(msgs):
            history[c] += m + toks[100 * turn + c]
        answers.append(toks)
        logits.append(lg)
    return answers, logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk", [7, None])
def test_multi_turn_logits_are_identical_with_the_cache_on_and_off(arch: str, chunk: int | None,
                                                                   monkeypatch) -> None:
    model = tiny_model(arch)
    system = random_prompts([37], seed=3)[0]  # crosses blocks of 4 mid-block: 9 full + 1
    users = [random_prompts([5, 9, 2], seed=10 + t) for t in range(3)]  # 3 turns of 3 conversations
    on = engine(model, True, chunk)
    off = engine(model, False, chunk)
    got = converse(on, system, users, monkeypatch)
    ref = converse(off, system, users, monkeypatch)
    assert got[0] == ref[0]
    for turn, (a, b) in enumerate(zip(got[1], ref[1])):
        for rid in b:
            assert torch.equal(a[rid], b[rid]), f"turn {turn} request {rid}: logits differ with the cache"
    assert off.prefix_hit_tokens == 0 and off.num_cached_blocks == 0
    # turns 2 and 3 reuse at least the system prompt's 9 full blocks per conversation
    assert on.prefix_hit_tokens >= 2 * 3 * 9 * BS
    assert on.num_cached_blocks > 0 and on.num_free_blocks == on.num_total_blocks


def test_only_prefill_computed_blocks_are_cached_and_turn_two_reuses_them(monkeypatch) -> None:
    model = tiny_model("llama")
    eng = engine(model, True, 7)
    system, u1, u2 = random_prompts([37, 5, 6], seed=4)
    toks, _ = run(eng, {1: system + u1}, GREEDY, monkeypatch)  # 42 tokens: 10 full blocks
    # the answer's 8 tokens filled blocks by decode steps: their KV is never cached
    assert eng.num_cached_blocks == 42 // BS
    turn2 = system + u1 + toks[1] + u2  # 56 tokens
    run(eng, {2: turn2}, GREEDY, monkeypatch)
    assert eng.prefix_hit_tokens == 42 // BS * BS  # the turn-1 prompt's full blocks, no more
    # turn 2's prefill recomputed the answer's tokens: now those blocks are prefill KV, cached
    assert len(turn2) % BS == 0 and eng.num_cached_blocks == len(turn2) // BS


def test_a_prompt_that_is_all_cached_still_computes_its_last_token(monkeypatch) -> None:
    model = tiny_model("llama")
    eng = engine(model, True, 7)
    p = random_prompts([32], seed=5)[0]  # exactly 8 blocks
    first, _ = run(eng, {1: p}, GREEDY, monkeypatch)
    again, _ = run(eng, {2: p}, GREEDY, monkeypatch)
    assert first[1] == again[2]
    assert eng.prefix_hit_tokens == 7 * BS  # the last block is recomputed for its last row


def test_eviction_under_pressure_keeps_held_blocks_and_preemption_still_works(monkeypatch) -> None:
    """A cache too small for everyone: cached blocks are evicted, sequences are preempted and
    recomputed (with hits on what is still cached); tokens equal the cache-off run's."""
    model = tiny_model("llama")
    system = random_prompts([21], seed=6)[0]
    prompts = {i: system + p for i, p in enumerate(random_prompts([3, 11, 6, 30, 2, 17], seed=7))}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = {}
    for caching in (True, False):
        eng = engine(model, caching, 7, num_blocks=40)
        run(eng, {90: random_prompts([60], seed=8)[0]}, params, monkeypatch)  # fills the cache
        preempted = []
        real = eng.scheduler._preempt
        monkeypatch.setattr(eng.scheduler, "_preempt", lambda s: (preempted.append(s.req_id), real(s)))
        results[caching] = run(eng, prompts, params, monkeypatch)[0]
        assert preempted, "the test must exercise preemption"
        if caching:
            assert eng.allocator.num_evicted > 0 and eng.prefix_hit_tokens > 0
    assert results[True] == results[False]


def prefiller(model: torch.nn.Module, chunk: int) -> Engine:
    """A prefill rank's engine (cluster/prefill.py sizes its cache the same way)."""
    return engine(model, True, chunk, num_blocks=60)


def land(dec: Engine, pre: Engine) -> dict[int, int]:
    """Drive a prefill engine to completion, landing on `dec` only the rows each destination
    lacks; the first token of every prompt."""
    first: dict[int, int] = {}

    def on_plan(chunks: list[PrefillChunk]) -> LayerKVHook:
        def hook(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for c in chunks:
                a, b = c.send_rows
                if b > a:
                    dec.write_prompt_kv(c.seq.req_id, layer, k[a:b].clone(), v[a:b].clone(),
                                        start=c.send_from)
        return hook

    while pre.has_work():
        pre.step(on_plan)
        for p in pre.prompts_done:
            first[p.req_id] = dec.add_prefilled(p.req_id, p.hidden)[0].token_id
    return first


def decode_all(dec: Engine, first: dict[int, int]) -> dict[int, list[int]]:
    toks = {rid: [t] for rid, t in first.items()}
    while dec.has_unfinished():
        for ev in dec.step():
            toks[ev.req_id].append(ev.token_id)
    return toks


@pytest.mark.parametrize("prefiller_cache", ["none", "warm"])
def test_a_decode_rank_reserves_and_receives_only_what_it_lacks(prefiller_cache: str, monkeypatch) -> None:
    """Turn 2 on a decode rank that holds turn 1's prompt: cached_tokens says so, the prefiller
    (cold: recomputes everything; warm: starts after its own hit) sends only the rest, and the
    tokens equal the colocated engine's without a cache."""
    model = tiny_model("llama")
    system, u1, u2 = random_prompts([37, 5, 6], seed=9)
    t1 = system + u1
    ref1, _ = run(engine(model, False), {1: t1}, GREEDY, monkeypatch)
    t2 = t1 + ref1[1] + u2
    ref2, _ = run(engine(model, False), {2: t2}, GREEDY, monkeypatch)

    dec = engine(model, True, 16)

    pre = prefiller(model, 11)
    assert dec.reserve(1, t1, GREEDY) and dec.held_tokens(1) == 0
    pre.add_prompt(1, t1, send_to=1, skip=0)
    assert decode_all(dec, land(dec, pre)) == ref1
    assert dec.num_cached_blocks == len(t1) // BS

    if prefiller_cache == "none":
        pre = prefiller(model, 11)  # the decode rank now holds more than this prefill rank
    assert dec.reserve(2, t2, GREEDY)
    skip = dec.held_tokens(2)
    assert skip == len(t1) // BS * BS
    with pytest.raises(ValueError, match="come from the prefix cache"):
        dec.write_prompt_kv(2, 0, torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), start=skip - 1)
    hits = pre.prefix_hit_tokens
    pre.add_prompt(2, t2, send_to=1, skip=skip)
    assert decode_all(dec, land(dec, pre)) == ref2
    assert pre.prefix_hit_tokens - hits == (skip if prefiller_cache == "warm" else 0)
    assert dec.allocator.num_held == 0 and pre.allocator.num_held == 0
    dec.allocator.check()
    pre.allocator.check()


def test_a_prefiller_holding_more_than_its_destination_starts_at_the_destination_skip(monkeypatch) -> None:
    model = tiny_model("llama")
    p = random_prompts([45], seed=11)[0]
    ref, _ = run(engine(model, False), {1: p}, GREEDY, monkeypatch)
    pre = prefiller(model, 16)
    warm = engine(model, True)
    assert warm.reserve(0, p, GREEDY)
    pre.add_prompt(0, p, send_to=1)
    decode_all(warm, land(warm, pre))  # the prefiller now caches p's full blocks
    dec = engine(model, True)  # a decode rank that holds nothing
    assert dec.reserve(1, p, GREEDY) and dec.held_tokens(1) == 0
    hits = pre.prefix_hit_tokens
    pre.add_prompt(1, p, send_to=2, skip=0)
    assert decode_all(dec, land(dec, pre)) == ref
    assert pre.prefix_hit_tokens == hits  # nothing reused: all of it had to be sent


def test_abort_of_a_request_holding_cached_blocks_frees_exactly_its_references(monkeypatch) -> None:
    model = tiny_model("llama")
    eng = engine(model, True)
    p = random_prompts([40], seed=12)[0]
    run(eng, {1: p}, GREEDY, monkeypatch)
    cached = eng.num_cached_blocks
    assert eng.reserve(2, p + [1, 2, 3], GREEDY) and eng.held_tokens(2) == 40
    assert eng.reserve(3, p + [4], GREEDY) and eng.held_tokens(3) == 40  # shares the same blocks
    assert eng.num_cached_blocks == 0  # held now, by two requests
    assert eng.abort(2) and not eng.abort(2)
    assert eng.num_cached_blocks == 0 and eng.allocator.num_held > 0  # request 3 still holds them
    assert eng.abort(3)
    assert eng.num_cached_blocks == cached and eng.allocator.num_held == 0
    eng.allocator.check()
    # a prefiller's abort mid-prompt frees its references too, and keeps what it had cached
    pre = prefiller(model, 8)
    pre.add_prompt(1, p, send_to=1)
    while pre.has_work():
        pre.step()
    assert pre.num_cached_blocks == 10
    pre.add_prompt(2, p + [7] * 9, send_to=1, skip=40)
    pre.step()  # request 2's first 8 tokens after its 40 cached ones
    assert pre.prefix_hit_tokens == 40
    assert pre.abort(2) and not pre.abort(2) and pre.allocator.num_held == 0
    assert pre.num_cached_blocks >= 10
    pre.allocator.check()


def test_cache_off_keeps_nothing(monkeypatch) -> None:
    model = tiny_model("llama")
    eng = engine(model, False)
    p = random_prompts([40], seed=13)[0]
    run(eng, {1: p}, GREEDY, monkeypatch)
    run(eng, {2: p}, GREEDY, monkeypatch)
    assert eng.prefix_hit_tokens == 0 and eng.num_cached_blocks == 0
    assert eng.reserve(3, p, GREEDY) and eng.held_tokens(3) == 0


@pytest.mark.slow
@pytest.mark.parametrize("which", ["f32", "bf16"])
def test_smollm2_multi_turn_chat_is_identical_with_the_cache(which: str, request, monkeypatch) -> None:
    from pd_local.model.weights import load_model
    from pd_local.tokenizer import Tokenizer

    path: Path = request.getfixturevalue("smollm2_f32_dir" if which == "f32" else "smollm2_dir")
    dtype = torch.float32 if which == "f32" else torch.bfloat16
    tok = Tokenizer.from_dir(path)
    model, _ = load_model(path, dtype)
    system = ("You are a patient assistant for a museum of natural history. Answer in one "
              "sentence, name the gallery where the visitor can see what they ask about, and "
              "never invent opening hours.")
    questions = ["Where are the dinosaurs?", "And the whales?", "Is there a cafe?"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    texts = {}
    for caching in (True, False):
        eng = Engine(model, EngineConfig(num_blocks=96, block_size=16, max_num_seqs=4,
                                         enable_prefix_caching=caching))
        messages = [{"role": "system", "content": system}]
        answers = []
        for q in questions:
            messages.append({"role": "user", "content": q})
            (ids, _), = eng.generate([tok.encode_chat(messages)], params)
            answers.append(ids)
            messages.append({"role": "assistant", "content": tok.decode(ids)})
        texts[caching] = answers
        assert (eng.prefix_hit_tokens > 0) == caching
        assert eng.num_free_blocks == eng.num_total_blocks
    assert texts[True] == texts[False]
