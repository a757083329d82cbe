"""Live migration at the engine facade (issue 19): a decoding request leaves one engine mid-stream
(migrate_out, read_kv, end_migration) and goes on in another (migrate_in, write_prompt_kv,
resume) with the tokens it would have had; every block is freed exactly once, on both sides,
whatever is aborted when."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams
from tests.tiny_models import random_prompts, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=14, ignore_eos=True,
                        frequency_penalty=0.5, repetition_penalty=1.2)


def engine(model: torch.nn.Module) -> Engine:
    return Engine(model, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8, max_prefill_tokens=32))


def run(eng: Engine, got: dict[int, list[int]], until: int | None = None, req: int = 0) -> None:
    """Step until `req` has `until` tokens (None: until nothing is left)."""
    while eng.has_work() and (until is None or len(got.get(req, [])) < until):
        for ev in eng.step():
            got.setdefault(ev.req_id, []).append(ev.token_id)


def move(src: Engine, dst: Engine, req_id: int, params: SamplingParams) -> int:
    """Migrate req_id from src to dst; the KV positions sent."""
    seq = src.migrate_out(req_id)
    state = seq.generator.get_state() if seq.generator is not None else None  # type: ignore[attr-defined]
    assert dst.migrate_in(req_id, seq.prompt_ids, seq.output_ids, params, state)
    held, end = dst.held_tokens(req_id), seq.num_tokens - 1
    for layer in range(src.model.config.num_layers):
        k, v = src.read_kv(req_id, layer, held, end)
        dst.write_prompt_kv(req_id, layer, k.clone(), v.clone(), start=held)
    src.end_migration(req_id)
    dst.resume(req_id)
    return end - held


def all_free(*engines: Engine) -> bool:
    return all(e.num_free_blocks == e.num_total_blocks and not e.has_unfinished() for e in engines)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_migrated_mid_stream_goes_on_with_identical_tokens(dtype: torch.dtype,
                                                                     params: SamplingParams) -> None:
    model = tiny_model(dtype=dtype)
    prompts = random_prompts([37, 9, 70], seed=5)
    want = {i: ids for i, (ids, _) in enumerate(engine(model).generate(prompts, [params] * 3))}
    a, b, got = engine(model), engine(model), {}
    for i, p in enumerate(prompts):
        a.add_request(i, p, params)
    run(a, got, until=5)
    assert move(a, b, 0, params) == len(prompts[0]) + 4  # nothing cached on b: all but the last token
    run(a, got)
    run(b, got)
    assert got == want
    assert all_free(a, b)


def test_only_what_the_destination_lacks_is_sent() -> None:
    """b already caches the prompt's full blocks (it served the same prompt): the migration
    sends the rest, and the tokens are still the same."""
    model = tiny_model()
    prompt = random_prompts([37], seed=6)[0]
    want = engine(model).generate([prompt], [SEEDED])[0][0]
    a, b, got = engine(model), engine(model), {}
    b.generate([prompt], [SamplingParams(max_tokens=1)])  # leaves 9 full blocks cached
    a.add_request(0, prompt, SEEDED)
    run(a, got, until=6)
    sent = move(a, b, 0, SEEDED)
    assert sent == len(prompt) + 5 - 36 and b.prefix_hit_tokens >= 36
    run(b, got)
    assert got[0] == want and all_free(a, b)


def test_aborts_during_a_migration_free_every_block_once() -> None:
    model = tiny_model()
    prompt = random_prompts([30], seed=7)[0]
    a, b, got = engine(model), engine(model), {}
    a.add_request(0, prompt, GREEDY)
    run(a, got, until=3)
    seq = a.migrate_out(0)
    assert a.num_free_blocks < a.num_total_blocks and a.load().running == 0
    assert b.migrate_in(0, seq.prompt_ids, seq.output_ids, GREEDY)
    k, v = a.read_kv(0, 0, 0, 8)
    b.write_prompt_kv(0, 0, k, v)  # part of the KV landed
    assert a.abort(0) and b.abort(0)  # the client left mid-migration: both sides let go
    assert not a.abort(0) and not b.abort(0)  # once
    with pytest.raises(KeyError):
        a.end_migration(0)
    assert all_free(a, b)


def test_what_cannot_migrate_is_refused_with_the_reason() -> None:
    model = tiny_model()
    a = engine(model)
    a.add_request(0, random_prompts([20], seed=8)[0], GREEDY)
    with pytest.raises(ValueError, match="request 0 is not decoding here \\(waiting\\)"):
        a.migrate_out(0)
    with pytest.raises(ValueError, match="request 9 is not decoding here \\(gone\\)"):
        a.migrate_out(9)
    with pytest.raises(ValueError, match="nothing generated yet"):
        engine(model).migrate_in(1, [1, 2, 3], [], GREEDY)
    got: dict[int, list[int]] = {}
    run(a, got, until=2)
    seq = a.migrate_out(0)
    with pytest.raises(ValueError, match=r"KV \[0, 30\) outside \[0, 21\)"):
        a.read_kv(0, 0, 0, 30)
    a.end_migration(0, moved=False)  # the destination refused: it decodes on here
    run(a, got)
    assert got[0] == engine(model).generate([seq.prompt_ids], [GREEDY])[0][0] and all_free(a)


@pytest.mark.slow
def test_structured_output_migrates_with_its_grammar_where_it_was(smollm2_dir: Path) -> None:
    """The destination's matcher replays the tokens already sampled: the JSON goes on with the
    tokens one engine gives (seeded sampling, so the mask decides which tokens are possible)."""
    from pd_local.engine.structured import GrammarTokenizer, json_grammar
    from pd_local.model.weights import load_model
    from pd_local.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    model = load_model(smollm2_dir, torch.float32)[0]
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a city as JSON."}])
    schema = {"type": "object", "required": ["city", "population"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer"}}}
    params = SamplingParams(temperature=0.9, seed=4, max_tokens=40, grammar=json_grammar(schema))

    def eng() -> Engine:
        return Engine(model, EngineConfig(kv_cache_gb=0.05), stop_token_ids=tok.stop_token_ids,
                      grammar_tokenizer=GrammarTokenizer(tok))
    want = eng().generate([prompt], [params])[0][0]
    a, b, got = eng(), eng(), {}
    a.add_request(0, prompt, params)
    run(a, got, until=6)
    move(a, b, 0, params)
    run(b, got)
    assert got[0] == want and len(want) > 6
    assert set(json.loads(tok.decode(got[0]))) == {"city", "population"}
    assert all_free(a, b)
