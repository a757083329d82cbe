"""Continuous-batching scheduler: pure Python, no tensors, no torch.distributed.

Each call to `schedule()` returns one `SchedulerOutput`: either a prefill batch (new or
recomputed sequences, within a token budget, admitted only when their KV blocks are allocated) or
a decode batch (every running sequence, each guaranteed a slot for the token it writes).
Prefill goes first when it can, as in vLLM v0 / nano-vllm: it keeps the running batch full.

Block ownership: a sequence owns `block_ids` from admission (or `reserve`) until `finish`,
`abort` or preemption, each of which frees them exactly once and empties the list.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from pd_local.engine.kv_cache import BlockAllocator, blocks_for
from pd_local.engine.sampling import SamplingParams


class SeqStatus(Enum):
    WAITING = "waiting"  # queued for (re)prefill on this rank
    RESERVED = "reserved"  # decode rank: blocks held, KV arriving from a prefill rank
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: object | None = None  # torch.Generator; opaque here
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


@dataclass
class SchedulerOutput:
    """The one object that goes from scheduler to model runner per step."""

    is_prefill: bool
    seqs: list[Sequence]
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_prefill_tokens: int,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved: dict[int, Sequence] = {}
        self.by_id: dict[int, Sequence] = {}

    # -- admission -------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.req_id in self.by_id:
            raise ValueError(f"request id {seq.req_id} is already in the scheduler")
        seq.status = SeqStatus.WAITING
        self.by_id[seq.req_id] = seq
        self.waiting.append(seq)

    def try_reserve(self, seq: Sequence) -> bool:
        """Decode rank: hold the blocks for seq's prompt KV, which a prefill rank will send.

        Refuses (returns False, holds nothing) while preempted sequences wait for recompute, the
        running batch is full, or the blocks would not leave one free block per running sequence
        (their next decode step must not be starved by a reservation).
        """
        if seq.req_id in self.by_id:
            raise ValueError(f"request id {seq.req_id} is already in the scheduler")
        if self.waiting or len(self.running) + len(self.reserved) >= self.max_num_seqs:
            return False
        need = blocks_for(seq.num_tokens, self.block_size)
        if not self.allocator.can_allocate(need + len(self.running)):
            return False
        seq.block_ids = self.allocator.allocate(need)
        seq.status = SeqStatus.RESERVED
        self.reserved[seq.req_id] = seq
        self.by_id[seq.req_id] = seq
        return True

    def promote_reserved(self, req_id: int) -> Sequence:
        """Decode rank: the KV has landed; the sequence joins the running batch."""
        seq = self.reserved.pop(req_id)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return seq

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput | None:
        prefill = self._schedule_prefill()
        if prefill:
            return SchedulerOutput(is_prefill=True, seqs=prefill)
        if not self.running:
            return None
        preempted = self._reserve_decode_slots()
        if not self.running:
            return SchedulerOutput(is_prefill=False, seqs=[], preempted=preempted)
        return SchedulerOutput(is_prefill=False, seqs=list(self.running), preempted=preempted)

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            if len(self.running) + len(self.reserved) + len(batch) >= self.max_num_seqs:
                break
            # A prompt longer than the budget still runs, alone: otherwise it never would.
            if batch and tokens + seq.num_tokens > self.max_prefill_tokens:
                break
            need = blocks_for(seq.num_tokens, self.block_size)
            if not self.allocator.can_allocate(need):
                break
            seq.block_ids = self.allocator.allocate(need)
            self.waiting.popleft()
            batch.append(seq)
            tokens += seq.num_tokens
        for seq in batch:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        return batch

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Give every running sequence a slot for position num_tokens - 1 (the token it feeds),
        preempting the newest running sequences (recompute) when blocks run out."""
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = blocks_for(seq.num_tokens, self.block_size) - len(seq.block_ids)
            if need <= 0:
                i += 1
                continue
            if self.allocator.can_allocate(need):
                seq.block_ids += self.allocator.allocate(need)
                i += 1
                continue
            victim = self.running.pop()  # newest first; may be seq itself
            self._preempt(victim)
            preempted.append(victim)
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- completion ------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a running sequence and free its blocks (exactly once)."""
        self.running.remove(seq)
        self._release(seq, reason)

    def abort(self, req_id: int) -> Sequence | None:
        """Drop a request in any state; returns it, or None if unknown (already finished)."""
        seq = self.by_id.get(req_id)
        if seq is None:
            return None
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RESERVED:
            del self.reserved[req_id]
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        self._release(seq, "abort")
        return seq

    def _release(self, seq: Sequence, reason: str) -> None:
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self.by_id[seq.req_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.reserved)
