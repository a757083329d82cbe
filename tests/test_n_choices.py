"""n > 1 in the engine: the prompt is prefilled once and forked (full blocks shared, the partial
one copied), each choice equals its seed's request alone, and every block is freed once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams
from pd_local.model.llama import LlamaForCausalLM
from pd_local.model.weights import load_model
from pd_local.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path):
    return Tokenizer.from_dir(smollm2_dir), load_model(smollm2_dir, torch.bfloat16)[0]


def run(engine: Engine, requests: list[tuple[int, list[int], SamplingParams, tuple[int, ...]]],
        abort_after_step: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Every request's tokens; abort_after_step {req_id: step}: abort it after that step."""
    out: dict[int, list[int]] = {}
    for req_id, prompt, params, followers in requests:
        engine.add_request(req_id, prompt, params, followers)
        out.update({i: [] for i in (req_id, *followers)})
    step = 0
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.req_id].append(ev.token_id)
        step += 1
        for req_id, at in (abort_after_step or {}).items():
            if at == step:
                engine.abort(req_id)
    engine.allocator.check()
    assert engine.num_free_blocks == engine.num_total_blocks
    return out


def forwarded_tokens(monkeypatch) -> list[int]:
    rows: list[int] = []
    real = LlamaForCausalLM.forward

    def spy(self, ids, *args, **kw):
        rows.append(ids.shape[0])
        return real(self, ids, *args, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    return rows


@pytest.mark.parametrize("words", [5, 32], ids=["partial-block", "longer"])
def test_choices_equal_their_seeds_alone_and_the_prompt_is_computed_once(smollm2, monkeypatch, words) -> None:
    tok, model = smollm2
    prompt = tok.encode(" ".join(["river"] * words) + " flows")
    params = SamplingParams(temperature=0.9, seed=100, max_tokens=10, ignore_eos=True)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.05, block_size=16))
    rows = forwarded_tokens(monkeypatch)
    got = run(engine, [(1, prompt, params, (2, 3))])
    assert sum(rows) == len(prompt) + sum(len(t) - 1 for t in got.values())  # one prefill
    assert len({tuple(t) for t in got.values()}) == 3, "three seeds, three samples"
    for i, req_id in enumerate((1, 2, 3)):
        alone = run(engine, [(9, prompt, SamplingParams(temperature=0.9, seed=100 + i, max_tokens=10,
                                                         ignore_eos=True), ())])
        assert got[req_id] == alone[9]


def test_aborts_before_the_fork(smollm2) -> None:
    """A choice aborted while riding leaves; a leader aborted before its first token leaves its
    riders to prefill alone; either way the others finish as they would alone."""
    tok, model = smollm2
    prompt = tok.encode("Tell me about the moon and the stars and the sea " * 4)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.05, max_prefill_tokens=16,  # several chunks
                                        enable_prefix_caching=False))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = run(engine, [(9, prompt, greedy, ())])[9]
    got = run(engine, [(1, prompt, greedy, (2, 3))], abort_after_step={2: 1})
    assert got[2] == [] and got[1] == got[3] == alone
    got = run(engine, [(1, prompt, greedy, (2, 3))], abort_after_step={1: 1})
    assert got[1] == [] and got[2] == got[3] == alone


def test_a_choice_without_a_block_for_its_copy_prefills_alone(smollm2) -> None:
    tok, model = smollm2
    prompt = tok.encode("one two three four five six seven eight nine ten eleven")  # a partial block
    # 2 blocks: the leader's prompt needs 1; the one left is the first follower's copy
    engine = Engine(model, EngineConfig(num_blocks=2, block_size=16, max_model_len=32))
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    got = run(engine, [(1, prompt, greedy, (2, 3))])
    assert got[1] == got[2] == got[3] and len(got[1]) == 3


def test_a_decode_rank_aborting_a_queued_request_keeps_its_other_choices() -> None:
    """A Reserve waiting for blocks: aborting one of its other choices drops it once reserved;
    aborting the request itself leaves its other choices queued alone, each with its own seed."""
    from collections import deque

    from pd_local.cluster.dist import Role
    from pd_local.cluster.messages import Abort, Reserve
    from pd_local.cluster.worker import Worker

    loop = Worker.__new__(Worker)  # the admission queue alone: no links, no engine
    loop.admission, loop.aborted_followers, loop.engine, loop.role = deque(), set(), None, Role.DECODE
    loop.paused, loop.migrating_in, loop.hiddens, loop.lockstep = {}, set(), {}, None
    sampling = SamplingParams(seed=40)
    loop.admission.extend([Reserve(1, (5, 6), sampling, (2, 3, 4)), Reserve(9, (7,), SamplingParams())])
    loop._handle(Abort(3))
    assert loop.aborted_followers == {3} and len(loop.admission) == 2
    loop._handle(Abort(1))
    assert [(r.req_id, r.sampling.seed, r.followers) for r in loop.admission] == [(2, 41, ()), (4, 43, ()), (9, None, ())]
    assert loop.aborted_followers == set()

    class Refusing:  # an engine that rejects the request: its aborted choice is forgotten too
        def reserve(self, *args) -> bool:
            raise ValueError("prompt too long")

    sent: list = []
    loop.engine, loop.admission = Refusing(), deque([Reserve(20, (5,), sampling, (21, 22))])
    loop.to_router = type("R", (), {"send": lambda self, m: sent.append(m)})()
    loop._handle(Abort(21))
    loop._admit()
    assert loop.aborted_followers == set() and [m.req_id for m in sent] == [20] and not loop.admission
