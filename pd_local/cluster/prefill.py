"""The prefill rank loop: computes the prompts it is sent and streams each layer's K/V to the
decode rank that reserved the blocks; runs lm_head only for prompt logprobs. Chunked (the
default) through a `ChunkedPrefiller`, else whole prompts up to max_prefill_tokens. PrefillDone
follows a prompt's last sends; an aborted prompt is dropped, sends under way finish."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable

import torch

from pd_local.cluster.dist import DistContext
from pd_local.engine.engine import prefill_hidden, prefix_salt
from pd_local.engine.logprobs import prompt_logprobs
from pd_local.engine.kv_cache import blocks_for
from pd_local.engine import threads as cpu_threads
from pd_local.engine.prefiller import ChunkedPrefiller
from pd_local.model.config import ModelConfig
from pd_local.model.dtype import resolve_dtype
from pd_local.model.llama import LlamaForCausalLM
from pd_local.model.weights import load_model
from pd_local.cluster.channel import Heartbeater, Inbox, Receiver, Sender
from pd_local.cluster.messages import (Abort, Fatal, KVEntry, Prefill, PrefillDone, PromptLogprobs,
                                       ProtocolError, Ready, Shutdown, Stats, TransferMode)
from pd_local.cluster.ipc_transfer import kv_sender
from pd_local.cluster.transfer import KVShape

log = logging.getLogger(__name__)


class PrefillLoop:
    """Construct right after init_distributed, before the model loads (see decode.DecodeLoop:
    receivers and heartbeats must run while the weights load)."""

    def __init__(self, ctx: DistContext, shape: KVShape) -> None:
        self.ctx = ctx
        me, cfg = ctx.rank, ctx.cfg
        self.inbox = Inbox()
        self.receiver = Receiver(ctx.links.to_prefill[me], self.inbox)
        self.to_router = Sender(ctx.links.from_prefill[me])
        mode = TransferMode[cfg.transfer.upper()]
        self.kv = {d: kv_sender(ctx, pair, shape, mode)  # CUDA IPC for a same-GPU pair
                   for (_, d), pair in ctx.links.kv.items()}
        self.heartbeat = Heartbeater([self.to_router, *(s.header for s in self.kv.values())],
                                     cfg.timeouts.heartbeat_s, self.inbox)
        self.pending: deque[Prefill] = deque()
        self.model: LlamaForCausalLM  # loaded by run()
        self.prefiller: ChunkedPrefiller | None = None  # engine.chunked_prefill: built by run()
        self.dest: dict[int, int] = {}  # chunked: req_id -> decode rank, until its last chunk
        # chunked: req_id -> (its first chunk's step start, that chunk's first position: the
        # prompt tokens before it came from this rank's prefix cache)
        self.started: dict[int, tuple[float, int]] = {}

    def run(self, make_model: Callable[[], LlamaForCausalLM]) -> None:
        """Load the model, then serve until the router's Shutdown. Any error: tell the router
        (Fatal), then raise."""
        try:
            self.model = make_model()
            if self.ctx.cfg.engine.chunked_prefill:
                self.prefiller = self._make_prefiller()
            # a chunking prefill rank reports its own cache (prefix routing sizes its index by it)
            self.to_router.send(Ready(0, self.prefiller.allocator.num_total if self.prefiller else 0,
                                      *cpu_threads.in_effect()))
            while True:
                item = self.inbox.get(timeout=0 if self._has_work() else None)
                while item is not None:
                    msg = item[1]
                    if isinstance(msg, Shutdown):
                        self._shutdown()
                        return
                    if isinstance(msg, Prefill):
                        self._add(msg)
                    elif isinstance(msg, Abort):
                        self._abort(msg.req_id)
                    else:
                        raise ProtocolError(f"prefill rank {self.ctx.rank}: unexpected {msg!r}")
                    item = self.inbox.poll()
                if self.prefiller is not None and self.prefiller.has_pending():
                    self._run_step()
                    a = self.prefiller.allocator
                    self.to_router.send(Stats(a.num_free, a.num_total, 0, self.prefiller.num_pending,
                                              self.prefiller.pending_tokens, a.num_cached,
                                              self.prefiller.prefix_hit_tokens))
                elif self.pending:
                    self._run_batch(self._next_batch())
                    self.to_router.send(Stats(0, 0, 0, len(self.pending),
                                              sum(len(p.prompt_ids) for p in self.pending)))
        except BaseException as e:
            try:
                self.to_router.send(Fatal(self.ctx.rank, f"{type(e).__name__}: {e}"[:4000]))
            except Exception:
                pass
            raise

    def _has_work(self) -> bool:
        return bool(self.pending) or (self.prefiller is not None and self.prefiller.has_pending())

    def _make_prefiller(self) -> ChunkedPrefiller:
        """The chunked prefiller's cache holds only prompts in progress (a queued prompt waits
        for room): 2 longest prompts + one step's tokens, never less than one longest prompt,
        so every prompt a decode rank can accept fits."""
        e, mc = self.ctx.cfg.engine, self.model.config
        longest = min(e.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        blocks = blocks_for(2 * longest + e.max_prefill_tokens, e.block_size)
        return ChunkedPrefiller(self.model, blocks, e.block_size, e.max_prefill_tokens,
                                e.prefill_policy, device=self.ctx.device,
                                caching=e.enable_prefix_caching,
                                prefix_salt=prefix_salt(self.model, self.model.model.embed_tokens.weight.dtype))

    def _add(self, msg: Prefill) -> None:
        if msg.decode_rank not in self.kv:
            raise ProtocolError(f"Prefill for decode rank {msg.decode_rank}: no KV link from "
                                f"rank {self.ctx.rank} (links: {sorted(self.kv)})")
        if self.prefiller is None:
            self.pending.append(msg)
            return
        self.prefiller.add(msg.req_id, list(msg.prompt_ids), skip=msg.skip_tokens,
                           prompt_logprobs=msg.prompt_logprobs)
        self.dest[msg.req_id] = msg.decode_rank

    def _abort(self, req_id: int) -> None:
        """Drop a pending request; chunked, also one part-prefilled (its blocks here are freed)."""
        self.pending = deque(p for p in self.pending if p.req_id != req_id)
        if self.prefiller is not None and self.prefiller.abort(req_id):
            del self.dest[req_id]
            self.started.pop(req_id, None)

    def _run_step(self) -> None:
        """One chunked step: plan, announce per destination, forward (each layer's K/V goes out
        as it is computed), hidden states of the prompts it completes, wait for the sends."""
        t0 = time.monotonic()
        chunks = self.prefiller.plan(key=self.dest.__getitem__)  # grouped by destination
        if not chunks:
            raise RuntimeError(f"prefill rank {self.ctx.rank}: prompts pending, none planned")
        tokens: dict[int, list[tuple[int, int]]] = {}  # destination -> its rows of the step
        rows: dict[int, tuple[int, int]] = {}  # destination -> its rows of the returned hidden
        row = 0
        for d, group in itertools.groupby(chunks, key=lambda c: self.dest[c.req_id]):
            group = list(group)
            for c in group:
                self.started.setdefault(c.req_id, (t0, c.start))
            # only the rows the destination lacks (its prefix cache holds [0, skip))
            group = [c for c in group if c.send_rows[1] > c.send_rows[0]]
            if not group:
                continue
            tokens[d] = [c.send_rows for c in group]
            n_last = sum(c.is_last for c in group)
            rows[d] = (row, row + n_last)
            row += n_last
            self.kv[d].start([KVEntry(c.req_id, c.end - c.send_from, c.send_from, c.is_last,
                                      self.started[c.req_id][1] if c.is_last else 0)
                              for c in group])

        def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # k, v: [T, kv_heads, head_dim] for the whole step
            for d, pieces in tokens.items():
                self.kv[d].layer(layer, *rows_of(k, v, pieces))

        hidden = self.prefiller.run(chunks, on_layer_kv)  # [R, hidden]: the completed prompts
        t_computed = time.monotonic()
        for req_id, lps in self.prefiller.done_logprobs.items():  # before the hidden states
            self.to_router.send(PromptLogprobs(req_id, tuple(lps)))
        self.prefiller.done_logprobs.clear()
        for d, (a, b) in rows.items():
            self.kv[d].hidden(hidden[a:b])
        for d in rows:
            self.kv[d].finish()
        for c in chunks:
            if c.is_last:
                del self.dest[c.req_id]
                t_first, cached = self.started.pop(c.req_id)
                self.to_router.send(PrefillDone((c.req_id,), c.end, t_first, t_computed, (cached,)))

    def _next_batch(self) -> list[Prefill]:
        e = self.ctx.cfg.engine
        batch: list[Prefill] = []
        tokens = 0
        while self.pending and len(batch) < e.max_num_seqs:
            n = len(self.pending[0].prompt_ids)
            if batch and tokens + n > e.max_prefill_tokens:
                break
            batch.append(self.pending.popleft())
            tokens += n
        # Stable sort: each destination's requests become one contiguous token range.
        return sorted(batch, key=lambda p: p.decode_rank)

    def _run_batch(self, batch: list[Prefill]) -> None:
        t0 = time.monotonic()
        pieces: dict[int, list[tuple[int, int]]] = {}  # destination -> its token ranges to send
        rows: dict[int, tuple[int, int]] = {}  # destination -> (first row, end row) of its requests
        tok, row = 0, 0
        starts: list[int] = []  # each prompt's first row of the batch
        for d, group in itertools.groupby(batch, key=lambda p: p.decode_rank):
            group = list(group)
            if d not in self.kv:
                raise ProtocolError(f"Prefill for decode rank {d}: no KV link from "
                                    f"rank {self.ctx.rank} (links: {sorted(self.kv)})")
            pieces[d] = []
            for p in group:  # the decode rank's prefix cache holds [0, skip_tokens)
                starts.append(tok)
                pieces[d].append((tok + p.skip_tokens, tok + len(p.prompt_ids)))
                tok += len(p.prompt_ids)
            rows[d] = (row, row + len(group))
            row += len(group)
            self.kv[d].start([KVEntry(p.req_id, len(p.prompt_ids) - p.skip_tokens, p.skip_tokens)
                              for p in group])

        def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # k, v: [T, kv_heads, head_dim] for the whole batch
            for d, ranges in pieces.items():
                self.kv[d].layer(layer, *rows_of(k, v, ranges))

        asked = [(p, a) for p, a in zip(batch, starts) if p.prompt_logprobs is not None]
        hidden = prefill_hidden(self.model, [list(p.prompt_ids) for p in batch], self.ctx.device,
                                on_layer_kv=on_layer_kv, all_rows=bool(asked))  # [B or T, hidden]
        t_computed = time.monotonic()
        for p, a in asked:  # before the hidden states
            n = len(p.prompt_ids)
            lps = prompt_logprobs(self.model.compute_logits, hidden[a:a + n - 1], list(p.prompt_ids[1:]),
                                  p.prompt_logprobs or 0)
            self.to_router.send(PromptLogprobs(p.req_id, tuple(lps)))
        if asked:
            hidden = hidden[[a + len(p.prompt_ids) - 1 for p, a in zip(batch, starts)]]  # [B, hidden]
        for d, (a, b) in rows.items():
            self.kv[d].hidden(hidden[a:b])
        for d in rows:
            self.kv[d].finish()
        # t_end is the end of compute: the decode rank's kv_received minus it is the transfer
        # time left exposed after the overlap.
        self.to_router.send(PrefillDone(tuple(p.req_id for p in batch), tok, t0, t_computed))

    def _shutdown(self) -> None:
        """Close every KV link (the decode ranks' receivers exit on it), then answer the router."""
        self.heartbeat.stop()
        for s in self.kv.values():
            s.header.close()
        self.to_router.close()
        log.info("prefill rank %d: shut down", self.ctx.rank)


def rows_of(k: torch.Tensor, v: torch.Tensor, ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows [a, b) of each range, in order: a view when they are adjacent (the common case:
    nothing cached, or one request per destination), else a copy."""
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    if len(merged) == 1:
        a, b = merged[0]
        return k[a:b], v[a:b]
    return (torch.cat([k[a:b] for a, b in merged]), torch.cat([v[a:b] for a, b in merged]))


def run(ctx: DistContext) -> None:
    """Entry point for a prefill rank (launch.py)."""
    cfg = ctx.cfg
    dtype = resolve_dtype(cfg.dtype, cfg.device)  # "auto": same answer on every rank (one machine)
    loop = PrefillLoop(ctx, KVShape.of(ModelConfig.from_dir(cfg.model), dtype))
    exact = cfg.engine.batch_invariant
    loop.run(lambda: load_model(cfg.model, dtype, ctx.device)[0].set_batch_invariant(exact))
