"""Continuous batching with chunked prefill (no tensors): `schedule()` returns one mixed step, a
decode row per running sequence plus prefill chunks within `max_prefill_tokens`. A sequence
takes its longest cached prefix (never its last token) and owns its blocks until finish, abort or
preemption, which free them exactly once; a preempted one is prefilled again. A prompt prefilled
for another rank (`send_to`) ends with its last chunk: its KV and hidden state leave."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from pd_local.config import DEFAULT_PREFILL_POLICY
from pd_local.engine.kv_cache import BlockAllocator, block_hashes, blocks_for
from pd_local.engine.prefill_queue import Chunk, PrefillJob, PrefillQueue
from pd_local.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from pd_local.engine.logprobs import Logprob


class FinishReason(StrEnum):
    """Why a request ended, from the rank that ends it to the API (equal to its text)."""

    STOP = "stop"  # EOS, a stop token id (or, at the front-end, a stop string)
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"
    ERROR = "error"
    SENT = "sent"  # a prompt prefilled for another rank: its KV left


class SeqStatus(Enum):
    WAITING = "waiting"  # queued for (re)prefill on this rank, no blocks yet
    PREFILLING = "prefilling"  # blocks held, prefill chunks in progress
    RESERVED = "reserved"  # decode rank: blocks held, KV arriving from a prefill rank
    RUNNING = "running"
    MIGRATING = "migrating"  # leaving for another rank: blocks held while its KV is read
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
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    arrival: int | None = None  # place in the prefill queue, kept across preemptions
    # Prefix cache: tokens [0, num_cached) came with cached blocks at admission (or reserve);
    # block_hashes name the full blocks of the tokens being prefilled; the first num_registered
    # of them are in the cache (registered once their KV was computed by a prefill).
    num_cached: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    # params.prompt_logprobs: position p's holds prompt token p + 1's (no prefix cache then)
    prompt_logprobs: list[Logprob] = field(default_factory=list)
    # n > 1: the other choices, forked off this one's prompt KV when it samples its first token
    followers: list[Sequence] = field(default_factory=list)
    matcher: object | None = None  # params.grammar's llguidance matcher, made at its first sample
    # prefill rank: the decode rank that gets this prompt's KV, which holds [0, skip) already
    send_to: int | None = None
    skip: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def kv_landing(self) -> int:
        """Reserved: positions [0, n) whose KV another rank sends (a migrating-in sequence's last
        token has none yet: its next step computes it)."""
        return self.num_tokens - 1 if self.output_ids else len(self.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


@dataclass(frozen=True)
class PrefillChunk(Chunk):
    """Positions [start, end) of seq.all_ids, on top of the KV of [0, start) in its blocks."""

    seq: Sequence
    row: int = 0  # its first row among the step's prompt rows (after the decode rows)

    @property
    def send_from(self) -> int:
        """seq.send_to lacks positions [send_from, end) of this chunk."""
        return max(self.start, self.seq.skip)

    @property
    def send_rows(self) -> tuple[int, int]:
        """Prompt rows of the step whose K/V seq.send_to needs (empty when it holds them all)."""
        return self.row + min(self.send_from, self.end) - self.start, self.row + self.end - self.start


@dataclass
class SchedulerOutput:
    """The one object that goes from scheduler to model runner per step: decode rows first,
    then prefill chunks."""

    decode: list[Sequence]
    prefill: list[PrefillChunk]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token this step, in row order of the logits."""
        return self.decode + [c.seq for c in self.prefill if c.is_last and c.seq.send_to is None]

    @property
    def sent(self) -> list[PrefillChunk]:
        """The last chunks of prompts prefilled for another rank."""
        return [c for c in self.prefill if c.is_last and c.seq.send_to is not None]

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.end - c.start for c in self.prefill)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_prefill_tokens: int,
        chunked_prefill: bool = True,
        prefill_policy: str = DEFAULT_PREFILL_POLICY,
        prefix_salt: bytes = b"",
    ) -> None:
        self.allocator = allocator
        self.prefix_salt = prefix_salt  # what else names KV content: model, dtype
        self.prefix_hit_tokens = 0  # prompt tokens whose KV came from the cache, since start
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.queue = PrefillQueue(max_prefill_tokens, chunked_prefill, prefill_policy)
        self.running: list[Sequence] = []  # hold blocks: PREFILLING and RUNNING, oldest first
        self.reserved: dict[int, Sequence] = {}
        self.migrating: dict[int, Sequence] = {}
        self.by_id: dict[int, Sequence] = {}

    @property
    def waiting(self) -> list[Sequence]:
        """Sequences queued without blocks, in arrival order."""
        seqs = [self.by_id[j.key] for j in self.queue.jobs.values() if not j.admitted]
        return sorted(seqs, key=lambda s: s.arrival or 0)

    # -- admission -------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.req_id in self.by_id:
            raise ValueError(f"request id {seq.req_id} is already in the scheduler")
        seq.status = SeqStatus.WAITING
        self.by_id[seq.req_id] = seq
        seq.arrival = self.queue.add(seq.req_id, seq.num_tokens, seq.arrival).arrival

    def try_reserve(self, seq: Sequence) -> bool:
        """Decode rank: hold the blocks for seq's prompt KV. False (nothing held) while preempted
        sequences wait, the batch is full, or it would not leave a free block per running
        sequence."""
        if seq.req_id in self.by_id:
            raise ValueError(f"request id {seq.req_id} is already in the scheduler")
        if self.queue.num_unadmitted() or len(self.running) + len(self.reserved) >= self.max_num_seqs:
            return False
        if not self._take_blocks(seq, len(self.running)):
            return False
        seq.status = SeqStatus.RESERVED
        self.reserved[seq.req_id] = seq
        self.by_id[seq.req_id] = seq
        return True

    def promote_reserved(self, req_id: int) -> Sequence:
        """Decode rank: the KV has landed; the sequence joins the running batch."""
        seq = self.reserved.pop(req_id)
        self._register(seq, seq.kv_landing)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return seq

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step. Decode slots are reserved first (preempting the newest sequences when
        blocks run out), then prefill chunks fill the token budget with the blocks left."""
        preempted = self._reserve_decode_slots()
        decode = [s for s in self.running if s.status is SeqStatus.RUNNING]
        # a prefill rank's chunks by destination: each one's rows are contiguous
        chunks = sorted(self.queue.plan(admit=self._admit), key=lambda c: self.by_id[c.job.key].send_to or 0)
        prefill, row = [], 0
        for c in chunks:
            prefill.append(PrefillChunk(c.job, c.start, c.end, self.by_id[c.job.key], row))
            row += c.num_tokens
        return SchedulerOutput(decode, prefill, preempted)

    def advance(self, out: SchedulerOutput) -> None:
        """The step ran: its chunks' KV is in the blocks. A sequence whose prefill is complete
        becomes RUNNING (the caller appends the token it sampled)."""
        for c in out.prefill:
            self._register(c.seq, c.end)
        for job in self.queue.advance(out.prefill):
            self.by_id[job.key].status = SeqStatus.RUNNING

    def _admit(self, job: PrefillJob) -> bool:
        """Before a sequence's first chunk: hold the blocks of all its tokens, if there is room."""
        seq = self.by_id[job.key]
        if len(self.running) + len(self.reserved) >= self.max_num_seqs:
            return False
        if not self._take_blocks(seq, 0):
            return False
        job.num_computed = seq.num_cached  # the first chunk starts after the cached prefix
        seq.status = SeqStatus.PREFILLING
        self.running.append(seq)
        return True

    def _take_blocks(self, seq: Sequence, keep_free: int) -> bool:
        """Hold the blocks of all of seq's tokens, the cached prefix's first, leaving at least
        `keep_free` blocks free; False (nothing held) when they do not fit."""
        bs = self.block_size
        caching = self.allocator.caching and seq.params.prompt_logprobs is None
        hashes = block_hashes(seq.all_ids, bs, self.prefix_salt) if caching else []
        usable = (seq.num_tokens - 1) // bs
        if seq.send_to is not None:  # what the destination lacks is computed here, to be sent
            usable = min(usable, seq.skip // bs)
        got = self.allocator.hold(hashes[:usable], blocks_for(seq.num_tokens, bs), keep_free)
        if got is None:
            return False
        seq.block_ids, cached = got
        seq.block_hashes, seq.num_registered = hashes, cached
        seq.num_cached = cached * bs
        self.prefix_hit_tokens += seq.num_cached
        return True

    def _register(self, seq: Sequence, computed: int) -> None:
        """Tokens [0, computed) of seq's prefill have their KV: cache the full blocks."""
        last = min(computed // self.block_size, len(seq.block_hashes))
        for i in range(seq.num_registered, last):
            self.allocator.register(seq.block_ids[i], seq.block_hashes[i])
        seq.num_registered = max(seq.num_registered, last)

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Give every decoding sequence a slot for position num_tokens - 1 (the token it feeds),
        preempting the newest sequences holding blocks (recompute) when blocks run out."""
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = blocks_for(seq.num_tokens, self.block_size) - len(seq.block_ids)
            if seq.status is not SeqStatus.RUNNING or need <= 0:
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
        self.queue.remove(seq.req_id)  # a prefilling victim loses its progress
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.queue.add(seq.req_id, seq.num_tokens, seq.arrival)  # all_ids, recomputed in chunks

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """child (parent's prompt, no output yet) joins the running batch on parent's prompt
        KV: the full blocks shared, the partial last one copied into a new block (returned as
        (src, dst) for the caller to copy). OutOfBlocks when there is no block for the copy."""
        full = len(parent.prompt_ids) // self.block_size
        shared = parent.block_ids[:full]
        new = self.allocator.allocate(len(parent.block_ids) - full)  # 0 or 1
        self.allocator.share(shared)
        child.block_ids = shared + new
        child.block_hashes, child.num_registered = parent.block_hashes[:full], min(parent.num_registered, full)
        child.num_cached = parent.num_cached
        child.status = SeqStatus.RUNNING
        self.running.append(child)
        self.by_id[child.req_id] = child
        return (parent.block_ids[full], new[0]) if new else None

    # -- completion ------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a running sequence and free its blocks (exactly once)."""
        self.running.remove(seq)
        self._release(seq, reason)

    def abort(self, req_id: int) -> Sequence | None:
        """Drop a request in any state; returns it, or None if unknown (already finished)."""
        seq = self.by_id.get(req_id)
        if seq is None:
            return None
        if seq.status in (SeqStatus.WAITING, SeqStatus.PREFILLING):
            self.queue.remove(req_id)
        if seq.status is SeqStatus.RESERVED:
            del self.reserved[req_id]
        elif seq.status is SeqStatus.MIGRATING:
            del self.migrating[req_id]
        elif seq.status in (SeqStatus.RUNNING, SeqStatus.PREFILLING):
            self.running.remove(seq)
        self._release(seq, FinishReason.ABORT)
        return seq

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self.by_id[seq.req_id]

    def has_unfinished(self) -> bool:
        return bool(self.queue or self.running or self.reserved or self.migrating)

    def migrate_out(self, req_id: int) -> Sequence:
        """A running sequence stops decoding here; its blocks stay until `end_migration`."""
        seq = self.by_id.get(req_id)
        if seq is None or seq.status is not SeqStatus.RUNNING:
            raise ValueError(f"request {req_id} is not decoding here ({'gone' if seq is None else seq.status.value})")
        self.running.remove(seq)
        seq.status = SeqStatus.MIGRATING
        self.migrating[req_id] = seq
        return seq

    def end_migration(self, req_id: int, moved: bool) -> None:
        """Moved: its KV was sent, free its blocks (exactly once). Not moved: it runs again."""
        seq = self.migrating.pop(req_id)
        if moved:
            self._release(seq, FinishReason.SENT)
        else:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
