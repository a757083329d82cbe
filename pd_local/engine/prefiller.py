"""Chunked prefill for a prefill-only rank: keeps the KV of prompts in progress in a paged cache
of its own. A step is `plan()` (which chunks) then `run(chunks, on_layer_kv)` (hidden states of
the chunks that end a prompt). A prompt's blocks are freed once, after its last chunk or on abort;
a prompt added with `skip` never starts after it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd_local.config import DEFAULT_MAX_PASSED_TOKENS, DEFAULT_PREFILL_POLICY
from pd_local.engine.kv_cache import BlockAllocator, block_hashes, blocks_for, slots_for
from pd_local.engine.logprobs import Logprob, prompt_logprobs
from pd_local.engine.prefill_queue import Chunk, PrefillJob, PrefillQueue
from pd_local.model.attention import AttentionMetadata, host_to_device
from pd_local.model.kv_cache import PagedKVCache
from pd_local.model.llama import LayerKVHook, LlamaForCausalLM


@dataclass(frozen=True)
class PlannedChunk:
    req_id: int
    start: int  # positions [start, end) of the prompt
    end: int
    row: int  # first row of this chunk in the step's flattened batch
    is_last: bool  # completes the prompt: run() returns its last hidden state
    planned: Chunk
    send_from: int = 0  # the destination lacks positions [send_from, end) of this chunk

    @property
    def send_rows(self) -> tuple[int, int]:
        """Rows of the step whose K/V the destination needs (empty when it holds them all)."""
        return self.row + min(self.send_from, self.end) - self.start, self.row + self.end - self.start


class ChunkedPrefiller:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int = 16,
        max_prefill_tokens: int = 256,
        policy: str = DEFAULT_PREFILL_POLICY,
        max_passed_tokens: int = DEFAULT_MAX_PASSED_TOKENS,
        device: torch.device | str = "cpu",
        caching: bool = False,
        prefix_salt: bytes = b"",
    ) -> None:
        mc = model.config
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        dtype = model.model.embed_tokens.weight.dtype
        self.kv_cache = PagedKVCache(mc.num_layers, num_blocks, block_size, mc.num_kv_heads, mc.head_dim,
                                     dtype, self.device)
        self.allocator = BlockAllocator(num_blocks, caching=caching)
        self.queue = PrefillQueue(max_prefill_tokens, True, policy, max_passed_tokens)
        self.prefix_salt = prefix_salt
        self.prompts: dict[int, list[int]] = {}
        self.blocks: dict[int, list[int]] = {}
        self.skip: dict[int, int] = {}  # req_id -> tokens its destination holds already
        self.hashes: dict[int, list[bytes]] = {}  # req_id -> its full blocks' ids (caching)
        self.registered: dict[int, int] = {}  # req_id -> its blocks registered so far
        self.prefix_hit_tokens = 0  # prompt tokens not computed thanks to the cache, since start
        self.logprobs: dict[int, tuple[int, list[Logprob]]] = {}  # req_id -> (top k, so far)
        self.done_logprobs: dict[int, list[Logprob]] = {}  # completed by run(): take them

    def add(self, req_id: int, prompt_ids: list[int], skip: int = 0,
            prompt_logprobs: int | None = None) -> None:
        """Queue a prompt; its destination holds the KV of [0, skip) already. With
        prompt_logprobs (top k; then skip must be 0), run() completes done_logprobs[req_id]."""
        if not 0 <= skip < len(prompt_ids):
            raise ValueError(f"request {req_id}: skip {skip} outside [0, {len(prompt_ids)})")
        need = blocks_for(len(prompt_ids), self.block_size)
        if need > self.allocator.num_total:
            raise ValueError(f"request {req_id}: {len(prompt_ids)} tokens need {need} blocks, "
                             f"the prefill cache has {self.allocator.num_total}")
        if prompt_logprobs is not None:
            if skip:
                raise ValueError(f"request {req_id}: prompt logprobs need every position, skip is {skip}")
            self.logprobs[req_id] = (prompt_logprobs, [])
        self.queue.add(req_id, len(prompt_ids))
        self.prompts[req_id] = list(prompt_ids)
        self.skip[req_id] = skip

    def abort(self, req_id: int) -> bool:
        """Drop a queued or half-prefilled prompt and free its blocks; False if not here."""
        if self.queue.remove(req_id) is None:
            return False
        self._forget(req_id)
        return True

    def _forget(self, req_id: int) -> None:
        del self.prompts[req_id], self.skip[req_id]
        self.hashes.pop(req_id, None)
        self.logprobs.pop(req_id, None)
        self.registered.pop(req_id, None)
        self.allocator.free(self.blocks.pop(req_id, []))

    @property
    def num_cached_blocks(self) -> int:
        return self.allocator.num_cached

    def has_pending(self) -> bool:
        return bool(self.queue)

    @property
    def num_pending(self) -> int:
        """Prompts queued or part-prefilled."""
        return len(self.queue)

    @property
    def pending_tokens(self) -> int:
        """Prompt tokens still to prefill."""
        return sum(j.remaining for j in self.queue.jobs.values())

    def plan(self, key: Callable[[int], int] | None = None) -> list[PlannedChunk]:
        """This step's chunks (empty when nothing is queued or nothing fits in the cache), in
        the order of `key(req_id)` (stable; default the policy's) and rows assigned in that
        order: a prefill rank orders by destination so each one's rows are contiguous."""
        planned = self.queue.plan(admit=self._admit)
        if key is not None:
            planned = sorted(planned, key=lambda c: key(c.job.key))
        out: list[PlannedChunk] = []
        row = 0
        for c in planned:
            out.append(PlannedChunk(c.job.key, c.start, c.end, row, c.is_last, c,
                                    max(c.start, self.skip[c.job.key])))
            row += c.num_tokens
        return out

    def _admit(self, job: PrefillJob) -> bool:
        """Hold the blocks of the whole prompt, its cached prefix's first (at most up to the
        destination's skip: what it lacks must be computed here to be sent)."""
        bs, prompt = self.block_size, self.prompts[job.key]
        hashes = block_hashes(prompt, bs, self.prefix_salt) if self.allocator.caching else []
        usable = min((len(prompt) - 1) // bs, self.skip[job.key] // bs)
        got = self.allocator.hold(hashes[:usable], blocks_for(job.num_tokens, bs))
        if got is None:
            return False
        self.blocks[job.key], cached = got
        if hashes:
            self.hashes[job.key], self.registered[job.key] = hashes, cached
        job.num_computed = cached * bs
        self.prefix_hit_tokens += job.num_computed
        return True

    def _register(self, req_id: int, computed: int) -> None:
        hashes = self.hashes.get(req_id)
        if hashes is None:
            return
        last = min(computed // self.block_size, len(hashes))
        for i in range(self.registered[req_id], last):
            self.allocator.register(self.blocks[req_id][i], hashes[i])
        self.registered[req_id] = max(self.registered[req_id], last)

    def run(self, chunks: list[PlannedChunk], on_layer_kv: LayerKVHook | None = None) -> torch.Tensor:
        """Forward the planned chunks; returns [number of is_last chunks, hidden]."""
        if not chunks:
            raise ValueError("run() needs at least one planned chunk")
        bs, dev = self.block_size, self.device
        ids = [t for c in chunks for t in self.prompts[c.req_id][c.start:c.end]]
        pos = [p for c in chunks for p in range(c.start, c.end)]
        slots = [s for c in chunks for s in slots_for(self.blocks[c.req_id], c.start, c.end, bs)]
        meta = AttentionMetadata.mixed(
            [], [], [c.end - c.start for c in chunks], [c.start for c in chunks],
            [slots_for(self.blocks[c.req_id], 0, c.start, bs) for c in chunks], slots, bs, dev,
        )
        hidden = self.model(host_to_device(ids, dev), host_to_device(pos, dev), meta, self.kv_cache,
                            on_layer_kv)  # [T, hidden]
        last = [c.row + c.end - c.start - 1 for c in chunks if c.is_last]
        for c in chunks:
            self._register(c.req_id, c.end)
            if c.req_id in self.logprobs:
                k, got = self.logprobs[c.req_id]
                prompt = self.prompts[c.req_id]
                end = min(c.end, len(prompt) - 1)  # the last position predicts no prompt token
                rows = hidden[c.row:c.row + end - c.start]
                got += prompt_logprobs(self.model.compute_logits, rows, prompt[c.start + 1:end + 1], k)
                if c.is_last:
                    self.done_logprobs[c.req_id] = got
        for job in self.queue.advance([c.planned for c in chunks]):
            self._forget(job.key)
        return hidden[host_to_device(last, dev)]
