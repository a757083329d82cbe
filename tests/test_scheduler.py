"""Scheduler: admission by blocks, token budget, preemption, abort in every state; pure Python."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_local.engine.kv_cache import BlockAllocator
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.scheduler import Scheduler, Sequence, SeqStatus


def make(num_blocks: int = 16, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64,
         chunked: bool = True) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), block_size, max_num_seqs, budget, chunked, "fcfs")


def seq(i: int, n: int) -> Sequence:
    return Sequence(i, list(range(1, n + 1)), SamplingParams(temperature=0))


def test_prefill_respects_token_budget_but_runs_a_long_prompt_alone() -> None:
    s = make(num_blocks=64, budget=10, chunked=False)
    for i, n in enumerate([30, 4, 4, 4]):
        s.add(seq(i, n))
    first = s.schedule()
    assert [(c.seq.req_id, c.start, c.end) for c in first.prefill] == [(0, 0, 30)]
    s.advance(first)
    second = s.schedule()
    assert [c.seq.req_id for c in second.prefill] == [1, 2]  # 4 + 4 <= 10 < 12


def test_admission_waits_for_blocks() -> None:
    s = make(num_blocks=4, block_size=4)
    s.add(seq(0, 12))  # 3 blocks
    s.add(seq(1, 8))  # 2 blocks: only 1 left
    out = s.schedule()
    assert [c.seq.req_id for c in out.prefill] == [0]
    assert [q.req_id for q in s.waiting] == [1]


def test_decode_preempts_newest_and_frees_its_blocks() -> None:
    s = make(num_blocks=4, block_size=4)
    s.add(seq(0, 8))
    s.add(seq(1, 8))
    s.advance(s.schedule())  # both prefilled: all 4 blocks used
    for q in s.running:
        q.output_ids.append(5)  # 9 tokens: each needs a third block
    out = s.schedule()
    assert not out.prefill
    assert [q.req_id for q in out.preempted] == [1]
    assert [q.req_id for q in out.decode] == [0]
    assert s.waiting[0].req_id == 1 and s.waiting[0].block_ids == []
    assert len(s.running[0].block_ids) == 3 and s.allocator.num_free == 1


def test_abort_in_every_state_frees_exactly_once() -> None:
    s = make(num_blocks=16)
    s.add(seq(0, 8))
    s.advance(s.schedule())  # 0 running
    assert s.try_reserve(seq(2, 8))  # 2 reserved
    s.add(seq(1, 4))  # 1 waiting
    assert not s.try_reserve(seq(3, 4)), "reservations must not overtake waiting work"
    assert s.allocator.num_free == 16 - 2 - 2
    for rid in (0, 1, 2):
        assert s.abort(rid) is not None
    assert s.abort(0) is None  # second abort is a no-op, not a double free
    assert s.allocator.num_free == 16 and not s.has_unfinished()


def test_reserve_refuses_without_room_and_holds_nothing() -> None:
    s = make(num_blocks=4, block_size=4)
    assert not s.try_reserve(seq(0, 20))
    assert s.allocator.num_free == 4 and not s.reserved
    assert s.try_reserve(seq(1, 8))
    promoted = s.promote_reserved(1)
    assert promoted.status is SeqStatus.RUNNING and s.running == [promoted]


def test_duplicate_request_id_is_refused() -> None:
    s = make()
    s.add(seq(0, 4))
    with pytest.raises(ValueError, match="already in the scheduler"):
        s.add(seq(0, 4))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=12), st.integers(0, 2**16))
def test_random_workloads_finish_and_return_every_block(lengths: list[int], seed: int) -> None:
    rng = random.Random(seed)
    s = make(num_blocks=12, block_size=4, max_num_seqs=4, budget=32)
    for i, n in enumerate(lengths):
        s.add(seq(i, n))
    target = {i: rng.randint(1, 8) for i in range(len(lengths))}
    aborted = set(rng.sample(range(len(lengths)), k=len(lengths) // 4))
    for _ in range(2000):
        out = s.schedule()
        s.advance(out)
        if out.is_empty and not s.has_unfinished():
            break
        for q in out.sampled:
            q.output_ids.append(7)
            if q.req_id in aborted or len(q.output_ids) >= target[q.req_id]:
                s.finish(q, "length")
        held = [b for q in s.running + list(s.reserved.values()) for b in q.block_ids]
        assert s.allocator.num_free + len(held) == s.allocator.num_total
    assert not s.has_unfinished()
    assert s.allocator.num_free == s.allocator.num_total
