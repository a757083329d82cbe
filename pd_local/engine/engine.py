"""Engine: one process's model + paged KV cache + scheduler + sampler; `step()` runs each role.
Colocated: `add_request`. Decode rank: `reserve` -> `write_prompt_kv` -> `add_prefilled(hidden)`.
Prefill rank: `add_prompt(send_to)`, `step(on_plan)` -> `prompts_done`. No torch.distributed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from pd_local.config import EngineConfig
from pd_local.engine.kv_cache import BlockAllocator, OutOfBlocks, slots_for
from pd_local.model.kv_cache import PagedKVCache
from pd_local.model.attention import AttentionMetadata, host_to_device, write_kv
from pd_local.model.llama import LayerKVHook, LlamaForCausalLM
from pd_local.engine.logprobs import extend_prompt_logprobs, logprobs_of
from pd_local.engine.sampling import SamplingParams, adjust_logits, sample
from pd_local.engine.structured import GrammarTokenizer, mask_row
from pd_local.engine.events import Load, PromptDone, TokenEvent
from pd_local.engine.scheduler import FinishReason, PrefillChunk, Scheduler, SchedulerOutput, Sequence
from pd_local.engine.step_cost import CostFit

log = logging.getLogger(__name__)


PlanHook = Callable[[list[PrefillChunk]], LayerKVHook | None]


def prefix_salt(model: LlamaForCausalLM, dtype: torch.dtype) -> bytes:
    """What besides the tokens decides a block's KV: the model's shape and the dtype."""
    mc = model.config
    return f"{mc.num_layers}x{mc.hidden_size}/{mc.num_kv_heads}x{mc.head_dim}/{dtype}".encode()


class Engine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cfg: EngineConfig,
        stop_token_ids: frozenset[int] | set[int] = frozenset(),
        device: torch.device | str = "cpu",
        grammar_tokenizer: GrammarTokenizer | None = None,
    ) -> None:
        self.model = model.set_batch_invariant(cfg.batch_invariant)
        self.cfg = cfg
        self.device = torch.device(device)
        model.set_native_decode(cfg.native_linear if cfg.batch_invariant and self.device.type == "cpu" else False)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.grammar_tokenizer = grammar_tokenizer  # None: requests with a grammar are refused
        mc = model.config
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        per_block = PagedKVCache.bytes_per_block(
            mc.num_layers, cfg.block_size, mc.num_kv_heads, mc.head_dim, self.dtype
        )
        num_blocks = cfg.num_blocks or self._blocks_from_budget(per_block)
        # A sequence alone must always fit, or preemption could never make room for it.
        self.max_model_len = min(self.max_model_len, num_blocks * cfg.block_size)
        use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.kv_cache = PagedKVCache(  # with graphs, one block more: their padding rows' sink
            mc.num_layers, num_blocks + use_graphs, cfg.block_size, mc.num_kv_heads, mc.head_dim,
            self.dtype, self.device,
        )
        self.allocator = BlockAllocator(num_blocks, caching=cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, cfg.block_size, cfg.max_num_seqs, cfg.max_prefill_tokens,
                                   cfg.chunked_prefill, cfg.prefill_policy,
                                   prefix_salt=prefix_salt(model, self.dtype))
        self._leader: dict[int, Sequence] = {}  # a choice riding on another (n > 1) -> that one
        self.prefill_started: list[int] = []  # requests whose prefill began in the last step()
        self.prompts_done: list[PromptDone] = []  # prompts for other ranks the last step() ended
        self.cost = CostFit()  # its own steps' time, for budgets and placement
        self.graphs = None
        if use_graphs:
            from pd_local.model.cuda_graphs import DecodeGraphRunner

            width = -(-self.max_model_len // cfg.block_size)
            self.graphs = DecodeGraphRunner(model, self.kv_cache, cfg.max_num_seqs, width,
                                            sink_block=num_blocks, device=self.device)
            self.graphs.capture()
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GB, %s, %d B/token); max_model_len %d",
            num_blocks, cfg.block_size, num_blocks * cfg.block_size,
            num_blocks * per_block / 1e9, self.dtype, per_block // cfg.block_size, self.max_model_len,
        )

    def _blocks_from_budget(self, per_block: int) -> int:
        fraction = self.cfg.gpu_memory_fraction
        if self.cfg.kv_cache_gb is not None:
            budget = int(self.cfg.kv_cache_gb * 1e9)
            source = f"kv_cache_gb={self.cfg.kv_cache_gb}"
        elif self.device.type == "cuda" and fraction is not None:
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * fraction)
            source = f"{fraction:.0%} of {free / 1e9:.1f} GB free on {self.device}"
        else:
            raise ValueError(
                f"engine.gpu_memory_fraction={fraction} applies to CUDA only; on {self.device} "
                "set engine.kv_cache_gb or num_blocks"
            )
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"KV budget ({source}) is smaller than one block ({per_block} bytes)")
        return blocks

    # -- accounting ------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.allocator.num_total

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks whose KV the prefix cache keeps (they are part of num_free_blocks)."""
        return self.allocator.num_cached

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache, since start."""
        return self.scheduler.prefix_hit_tokens

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.queue.num_unadmitted() + len(self.scheduler.reserved)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_work(self) -> bool:
        """A step() would run something (a reservation awaiting its KV would not)."""
        return bool(self.scheduler.running) or self.scheduler.queue.num_unadmitted() > 0

    def load(self) -> Load:
        return Load(self.num_free_blocks, self.num_total_blocks, self.num_running, self.num_waiting, 0,
                    self.num_cached_blocks, self.prefix_hit_tokens, self.cost.cost(), *self.cost.busy)

    def set_prefill_budget(self, tokens: int) -> None:
        """Prompt tokens per step from now on (engine.max_prefill_tokens until set)."""
        if tokens < 1:
            raise ValueError(f"prefill budget must be >= 1 token, got {tokens}")
        self.scheduler.queue.budget = tokens

    def prefill_backlog(self) -> tuple[int, int, float]:
        """(prompts queued or part-prefilled, their tokens to compute, the oldest's wait in ms)."""
        jobs, now = self.scheduler.queue.jobs.values(), time.monotonic()
        return len(jobs), sum(j.remaining for j in jobs), 1000 * (now - min((j.since for j in jobs), default=now))

    def awaits_kv(self, req_id: int) -> bool:
        """Decode rank: the request is reserved and its prompt's KV has not all landed."""
        return req_id in self.scheduler.reserved

    # -- requests --------------------------------------------------------------------------

    def _new_sequence(self, req_id: int, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise ValueError(f"request {req_id}: empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"request {req_id}: prompt has {len(prompt_ids)} tokens, the context is "
                f"{self.max_model_len} (at least one token must be generated)"
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {req_id}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if params.grammar and self.grammar_tokenizer is None:
            raise ValueError(f"request {req_id}: structured output needs the engine's grammar_tokenizer")
        return Sequence(req_id, list(prompt_ids), params, generator=params.make_generator())

    def _with_followers(self, seq: Sequence, followers: tuple[int, ...]) -> Sequence:
        """n > 1: the other choices' sequences ride on seq until its first token (fork there)."""
        for i, fid in enumerate(followers, start=1):
            fp = seq.params.for_choice(i)
            seq.followers.append(Sequence(fid, seq.prompt_ids, fp, generator=fp.make_generator()))
            self._leader[fid] = seq
        return seq

    def add_request(self, req_id: int, prompt_ids: list[int], params: SamplingParams,
                    followers: tuple[int, ...] = ()) -> None:
        """Queue a request; `followers`: the ids of its other n - 1 choices (prefilled once)."""
        self.scheduler.add(self._with_followers(self._new_sequence(req_id, prompt_ids, params), followers))

    def add_prompt(self, req_id: int, prompt_ids: list[int], send_to: int, skip: int = 0,
                   prompt_logprobs: int | None = None) -> None:
        """Prefill rank: queue a prompt whose KV goes to rank send_to, which holds [0, skip)."""
        if not 0 <= skip < len(prompt_ids):
            raise ValueError(f"request {req_id}: skip {skip} outside [0, {len(prompt_ids)})")
        if prompt_logprobs is not None and skip:
            raise ValueError(f"request {req_id}: prompt logprobs need every position, skip is {skip}")
        seq = self._new_sequence(req_id, prompt_ids, SamplingParams(prompt_logprobs=prompt_logprobs))
        seq.send_to, seq.skip = send_to, skip
        self.scheduler.add(seq)

    def abort(self, req_id: int) -> bool:
        """Free whatever the request holds, in any phase. False if it is not here (finished).
        A choice still riding on its leader leaves it; a leader's riders go on alone."""
        leader = self._leader.pop(req_id, None)
        if leader is not None:
            leader.followers = [f for f in leader.followers if f.req_id != req_id]
            return True
        seq = self.scheduler.by_id.get(req_id)
        if seq is not None and seq.followers:
            for f in seq.followers:  # queued: they prefill the prompt themselves
                del self._leader[f.req_id]
                self.scheduler.add(f)
            seq.followers = []
        return self.scheduler.abort(req_id) is not None

    # -- PD decode-rank hooks --------------------------------------------------------------

    def reserve(self, req_id: int, prompt_ids: list[int], params: SamplingParams,
                followers: tuple[int, ...] = ()) -> bool:
        """Pre-allocate the prompt's blocks (the cached prefix's from the prefix cache); False
        (nothing held) when there is no room now. `held_tokens` says how much is cached."""
        seq = self._new_sequence(req_id, prompt_ids, params)
        if not self.scheduler.try_reserve(seq):
            return False
        self._with_followers(seq, followers)
        return True

    def held_tokens(self, req_id: int) -> int:
        """A reserved request's prompt tokens [0, n) whose KV this rank already holds: a
        prefill rank need send only the rest (write_prompt_kv refuses positions below n)."""
        return self.scheduler.reserved[req_id].num_cached

    def write_prompt_kv(
        self, req_id: int, layer: int, k: torch.Tensor, v: torch.Tensor, start: int = 0, heads: range | None = None
    ) -> None:
        """Land one layer of a reserved request's prompt KV for positions [start, start + T):
        k, v [T, kv_heads, head_dim]. Chunks may land in any order; add_prefilled trusts that
        every position of every layer has landed."""
        seq = self.scheduler.reserved[req_id]
        n = seq.kv_landing
        if k.shape[0] == 0 or start < seq.num_cached or start + k.shape[0] > n:
            raise ValueError(f"request {req_id}: got KV for {k.shape[0]} tokens at {start}, expects "
                             f"{n} (the first {seq.num_cached} come from the prefix cache)")
        slots = host_to_device(slots_for(seq.block_ids, start, start + k.shape[0], self.cfg.block_size),
                               self.device)
        write_kv(self.kv_cache.k[layer], self.kv_cache.v[layer],
                 k.to(self.device, self.dtype), v.to(self.device, self.dtype), slots, heads)

    # -- live migration (docs/architecture.md, Elastic workers) ---------------------------------

    def migrate_out(self, req_id: int) -> Sequence:
        """A decoding request leaves: it stops here, `read_kv` gives its KV of positions
        [0, num_tokens - 1), `end_migration` then frees its blocks (abort does too)."""
        return self.scheduler.migrate_out(req_id)

    def read_kv(self, req_id: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K, V [end - start, kv_heads, head_dim] of a migrating request's positions."""
        seq = self.scheduler.migrating[req_id]
        if not 0 <= start < end <= seq.num_tokens - 1:
            raise ValueError(f"request {req_id}: KV [{start}, {end}) outside [0, {seq.num_tokens - 1})")
        slots = host_to_device(slots_for(seq.block_ids, start, end, self.cfg.block_size), self.device)
        k, v = self.kv_cache.k[layer], self.kv_cache.v[layer]
        return k.view(-1, *k.shape[2:])[slots], v.view(-1, *v.shape[2:])[slots]

    def end_migration(self, req_id: int, moved: bool = True) -> None:
        """Moved: its KV was sent, free its blocks (once). Not: it decodes here again."""
        self.scheduler.end_migration(req_id, moved)

    def migrate_in(self, req_id: int, prompt_ids: list[int], output_ids: list[int], params: SamplingParams,
                   rng_state: torch.Tensor | None = None) -> bool:
        """Hold blocks for a request decoding elsewhere (its cached prefix from the prefix cache,
        `held_tokens`); write_prompt_kv lands the rest of [0, num_tokens - 1), `resume` runs it.
        rng_state: its generator's (seeded sampling goes on where it was). False: no room now."""
        if not output_ids:
            raise ValueError(f"request {req_id}: nothing generated yet, nothing to migrate")
        seq = self._new_sequence(req_id, prompt_ids, params)
        seq.output_ids = list(output_ids)
        if rng_state is not None and seq.generator is not None:
            seq.generator.set_state(rng_state)  # type: ignore[attr-defined]
        if params.grammar:  # structured output: its matcher replays the tokens, as the old rank's
            seq.matcher = m = self.grammar_tokenizer.matcher(params.grammar)  # type: ignore[union-attr]
            m.consume_tokens(seq.output_ids)
        return self.scheduler.try_reserve(seq)

    def resume(self, req_id: int) -> None:
        """A migrated-in request's KV has landed: it decodes on from its last token."""
        self.scheduler.promote_reserved(req_id)

    def add_prefilled(self, req_id: int, hidden: torch.Tensor) -> list[TokenEvent]:
        """The KV of a reserved request has fully landed: sample its first token from the last
        prompt position's hidden state [hidden] and let it join the running batch. Its event
        first, then its other choices' (n > 1: forked here)."""
        seq = self.scheduler.promote_reserved(req_id)
        logits = self.model.compute_logits(hidden.to(self.device, self.dtype).view(1, -1))  # [1, V]
        return self._append_tokens([seq], logits)

    # -- the step --------------------------------------------------------------------------

    def step(self, on_plan: PlanHook | None = None) -> list[TokenEvent]:
        """Run one scheduled step (decode rows of the running sequences plus prefill chunks);
        one event per sequence that got a token. on_plan(chunks) may return a layer KV hook."""
        out = self.scheduler.schedule()
        # a sequence's first chunk starts after its cached prefix (a recompute's too)
        self.prefill_started = [c.seq.req_id for c in out.prefill if c.start == c.seq.num_cached]
        self.prompts_done = []
        if out.is_empty:
            return []
        t0 = time.perf_counter()
        logits = self._run(out, on_plan(out.prefill) if on_plan is not None else None)
        self.scheduler.advance(out)
        for c in out.sent:  # its KV and hidden state are on their way: its blocks are free
            self.scheduler.finish(c.seq, FinishReason.SENT)
        events = self._append_tokens(out.sampled, logits) if out.sampled else []
        self.cost.add(len(out.decode), sum(c.end - c.start for c in out.prefill), (time.perf_counter() - t0) * 1e3)
        return events

    def _run(self, out: SchedulerOutput, on_layer_kv: LayerKVHook | None = None) -> torch.Tensor:
        """One fused forward over [decode rows, prefill chunk rows]; logits [len(out.sampled), V]."""
        bs = self.cfg.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for seq in out.decode:
            n = seq.num_tokens
            ids.append(seq.last_token)
            pos.append(n - 1)
            slots.append(seq.block_ids[(n - 1) // bs] * bs + (n - 1) % bs)
        rows = list(range(len(out.decode)))  # hidden rows that get sampled, in out.sampled order
        for c in out.prefill:
            ids += c.seq.all_ids[c.start:c.end]
            pos += range(c.start, c.end)
            slots += slots_for(c.seq.block_ids, c.start, c.end, bs)
            if c.is_last and c.seq.send_to is None:
                rows.append(len(ids) - 1)
        dev = self.device
        if not out.prefill and self.graphs is not None:  # pure decode on CUDA: replay a graph
            from pd_local.model.cuda_graphs import DecodeBatch

            batch = DecodeBatch(ids, pos, slots, [seq.block_ids for seq in out.decode],
                                [seq.num_tokens for seq in out.decode])
            logits = self.graphs.run(batch)  # None beyond the largest bucket: eager below
            if logits is not None:
                return logits
        # a step with prefill chunks (or past the largest graph) runs eagerly
        meta = AttentionMetadata.mixed(
            [seq.block_ids for seq in out.decode], [seq.num_tokens for seq in out.decode],
            [c.end - c.start for c in out.prefill], [c.start for c in out.prefill],
            [slots_for(c.seq.block_ids, 0, c.start, bs) for c in out.prefill], slots, bs, dev,
        )
        hidden = self.model(host_to_device(ids, dev), host_to_device(pos, dev), meta, self.kv_cache,
                            on_layer_kv)  # [T, hidden]
        extend_prompt_logprobs(out.prefill, len(out.decode), hidden, self.model.compute_logits)
        nd = len(out.decode)
        self.prompts_done = [PromptDone(c.seq.req_id, c.seq.send_to, hidden[nd + c.row + c.end - c.start - 1],  # type: ignore[arg-type]
                                        c.end, c.seq.num_cached,
                                        None if c.seq.params.prompt_logprobs is None else tuple(c.seq.prompt_logprobs))
                             for c in out.sent]
        if not rows:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)  # [0, V]
        return self.model.compute_logits(hidden[host_to_device(rows, dev)], len(out.decode))  # [S, V]

    def _fork(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Sequences about to sample their first token fork their followers, which sample theirs
        from the same logits row (a follower without a block for its copy queues instead)."""
        rows: list[int] = []
        forked: list[Sequence] = []
        for i, seq in enumerate(seqs):
            if not seq.followers or seq.output_ids:
                continue
            for f in seq.followers:
                del self._leader[f.req_id]
                try:
                    copy = self.scheduler.fork(seq, f)
                except OutOfBlocks:
                    self.scheduler.add(f)
                    continue
                if copy is not None:
                    self.kv_cache.copy_block(*copy)
                forked.append(f)
                rows.append(i)
            seq.followers = []
        if not forked:
            return seqs, logits
        return seqs + forked, torch.cat([logits, logits[rows]])

    def _append_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        seqs, logits = self._fork(seqs, logits)
        params = [s.params for s in seqs]
        adjusted = logits
        if any(p.adjusts_logits for p in params):  # penalties, logit bias, min_tokens
            stops = [frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.stop_token_ids)
                     for p in params]
            adjusted = adjust_logits(logits, params, [s.prompt_ids for s in seqs],
                                     [s.output_ids for s in seqs], stops)
        if any(p.grammar for p in params):  # structured output: the grammar's mask
            adjusted = adjusted.clone() if adjusted is logits else adjusted
            for i, s in enumerate(seqs):
                if s.params.grammar:
                    if s.matcher is None:
                        s.matcher = self.grammar_tokenizer.matcher(s.params.grammar)  # type: ignore[union-attr]
                    mask_row(s.matcher, adjusted[i])
        tokens = sample(adjusted, params, [s.generator for s in seqs])  # logprobs: of the raw logits
        events = []
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.output_ids.append(tok)
            if seq.matcher is not None:
                seq.matcher.consume_token(tok)  # type: ignore[attr-defined]
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            first = len(seq.output_ids) == 1
            k = seq.params.logprobs
            lp = logprobs_of(logits[i:i + 1], [tok], k)[0] if k is not None else None
            events.append(TokenEvent(seq.req_id, tok, reason is not None, reason,
                                     seq.num_cached if first else 0, lp,
                                     tuple(seq.prompt_logprobs) if first else (), first))
        return events

    def _finish_reason(self, seq: Sequence, tok: int) -> FinishReason | None:
        p = seq.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.stop_token_ids):
            return FinishReason.STOP
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- convenience -----------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams
    ) -> list[tuple[list[int], FinishReason]]:
        """Run prompts to completion with all of them in flight at once; (token ids, reason) each."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        base = int(time.monotonic_ns() % 2**40) << 16  # ids unlikely to collide with live ones
        results: dict[int, tuple[list[int], FinishReason]] = {}
        toks: dict[int, list[int]] = {}
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            self.add_request(base + i, p, sp)
            toks[base + i] = []
        while len(results) < len(prompts):
            events = self.step()
            if not events and not self.has_unfinished():
                raise RuntimeError("engine stalled with unfinished requests")
            for ev in events:
                toks[ev.req_id].append(ev.token_id)
                if ev.finished:
                    results[ev.req_id] = (toks[ev.req_id], ev.finish_reason or FinishReason.STOP)
        return [results[base + i] for i in range(len(prompts))]
