"""The prefill rank loop: an Engine prefills the prompts it is sent (`add_prompt`), each layer's
K/V streamed to the decode rank that reserved the blocks. PrefillDone follows a prompt's last
sends; an aborted prompt is dropped, sends under way finish."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable

import torch

from pd_local.cluster.dist import DistContext
from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine, PromptDone
from pd_local.engine.kv_cache import blocks_for
from pd_local.engine import threads as cpu_threads
from pd_local.engine.scheduler import PrefillChunk
from pd_local.model.config import ModelConfig
from pd_local.model.dtype import resolve_dtype
from pd_local.model.llama import LayerKVHook, LlamaForCausalLM
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
        self.engine: Engine  # built by run()
        self.started: dict[int, float] = {}  # req_id -> its first chunk's step start

    def run(self, make_engine: Callable[[], Engine]) -> None:
        """Build the engine, then serve until the router's Shutdown. Any error: tell the router
        (Fatal), then raise."""
        try:
            self.engine = e = make_engine()
            self.to_router.send(Ready(0, e.num_total_blocks, *cpu_threads.in_effect()))
            while True:
                item = self.inbox.get(timeout=0 if e.has_work() else None)
                while item is not None:
                    msg = item[1]
                    if isinstance(msg, Shutdown):
                        self._shutdown()
                        return
                    if isinstance(msg, Prefill):
                        self._add(msg)
                    elif isinstance(msg, Abort):
                        if e.abort(msg.req_id):
                            self.started.pop(msg.req_id, None)
                    else:
                        raise ProtocolError(f"prefill rank {self.ctx.rank}: unexpected {msg!r}")
                    item = self.inbox.poll()
                if e.has_work():
                    self._run_step()
                    self.to_router.send(Stats(e.num_free_blocks, e.num_total_blocks, 0, *e.prefill_backlog(),
                                              e.num_cached_blocks, e.prefix_hit_tokens))
        except BaseException as e:
            try:
                self.to_router.send(Fatal(self.ctx.rank, f"{type(e).__name__}: {e}"[:4000]))
            except Exception:
                pass
            raise

    def _add(self, msg: Prefill) -> None:
        if msg.decode_rank not in self.kv:
            raise ProtocolError(f"Prefill for decode rank {msg.decode_rank}: no KV link from "
                                f"rank {self.ctx.rank} (links: {sorted(self.kv)})")
        self.engine.add_prompt(msg.req_id, list(msg.prompt_ids), msg.decode_rank, msg.skip_tokens,
                               msg.prompt_logprobs)

    def _run_step(self) -> None:
        """Announce per destination, forward (each layer's K/V leaves as it is computed), the
        completed prompts' hidden states, wait for the sends."""
        t0 = time.monotonic()
        sending: list[int] = []  # destinations of this step, in row order

        def on_plan(chunks: list[PrefillChunk]) -> LayerKVHook:
            if not chunks:
                raise RuntimeError(f"prefill rank {self.ctx.rank}: prompts pending, none planned")
            tokens: dict[int, list[tuple[int, int]]] = {}  # destination -> its rows of the step
            for d, group in itertools.groupby(chunks, key=lambda c: c.seq.send_to):
                group = list(group)
                for c in group:
                    self.started.setdefault(c.seq.req_id, t0)
                # only the rows the destination lacks (its prefix cache holds [0, skip))
                group = [c for c in group if c.send_rows[1] > c.send_rows[0]]
                if group:
                    tokens[d] = [c.send_rows for c in group]
                    self.kv[d].start([KVEntry(c.seq.req_id, c.end - c.send_from, c.send_from, c.is_last,
                                              c.seq.num_cached if c.is_last else 0) for c in group])
            sending.extend(tokens)

            def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
                for d, pieces in tokens.items():
                    self.kv[d].layer(layer, *rows_of(k, v, pieces))
            return on_layer_kv

        e = self.engine
        e.step(on_plan)
        t_computed = time.monotonic()
        done: list[PromptDone] = e.prompts_done
        for p in done:  # before the hidden states
            if p.prompt_logprobs is not None:
                self.to_router.send(PromptLogprobs(p.req_id, p.prompt_logprobs))
        for d in sending:
            mine = [p.hidden for p in done if p.send_to == d]
            self.kv[d].hidden(torch.stack(mine) if mine else torch.empty(0, e.model.config.hidden_size,
                                                                         dtype=e.dtype, device=e.device))
        for d in sending:
            self.kv[d].finish()
        for p in done:
            self.to_router.send(PrefillDone((p.req_id,), p.num_tokens, self.started.pop(p.req_id),
                                            t_computed, (p.num_cached,)))

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
    loop.run(lambda: prefill_engine(load_model(cfg.model, dtype, ctx.device)[0], cfg.engine, ctx.device))


def prefill_engine(model: LlamaForCausalLM, e: EngineConfig, device: torch.device | str) -> Engine:
    """Its cache: 2 longest prompts + one step's tokens (docs/architecture.md). No decode kernels."""
    mc = model.config
    longest = min(e.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    blocks = blocks_for(2 * longest + e.max_prefill_tokens, e.block_size)
    return Engine(model, dataclasses.replace(e, num_blocks=blocks, cuda_graphs=False, native_linear=False),
                  device=device)
