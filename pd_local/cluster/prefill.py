"""The prefill rank loop: batches Prefill requests, runs the model without a KV cache, and
streams each layer's K/V to the decode ranks that reserved the blocks (DESIGN.md step 4).

A batch is the oldest pending requests up to engine.max_prefill_tokens (a longer prompt runs
alone) and engine.max_num_seqs, ordered by destination so each decode rank's tokens form one
contiguous range of the flattened batch: per layer, one K and one V slice per destination go
out by isend while the next layer computes (transfer.py). After the last layer the final
hidden state of each prompt's last position follows; the batch is done when every send has
completed, and only then does the router hear PrefillDone. The rank keeps no KV: it never runs
lm_head and owns no blocks.

Abort: a pending request is dropped; one in the batch being computed finishes its transfer
(never cut) and the decode rank discards it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable

import torch

from pd_local.cluster.dist import DistContext
from pd_local.engine.engine import prefill_hidden
from pd_local.model.config import ModelConfig
from pd_local.model.dtype import resolve_dtype
from pd_local.model.llama import LlamaForCausalLM
from pd_local.model.weights import load_model
from pd_local.cluster.channel import Heartbeater, Inbox, Receiver, Sender
from pd_local.cluster.messages import (Abort, Fatal, KVEntry, Prefill, PrefillDone, ProtocolError,
                                       Ready, Shutdown, Stats, TransferMode)
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

    def run(self, make_model: Callable[[], LlamaForCausalLM]) -> None:
        """Load the model, then serve until the router's Shutdown. Any error: tell the router
        (Fatal), then raise."""
        try:
            self.model = make_model()
            self.to_router.send(Ready(0, 0))
            while True:
                item = self.inbox.get(timeout=0 if self.pending else None)
                while item is not None:
                    msg = item[1]
                    if isinstance(msg, Shutdown):
                        self._shutdown()
                        return
                    if isinstance(msg, Prefill):
                        self.pending.append(msg)
                    elif isinstance(msg, Abort):
                        self.pending = deque(p for p in self.pending if p.req_id != msg.req_id)
                    else:
                        raise ProtocolError(f"prefill rank {self.ctx.rank}: unexpected {msg!r}")
                    item = self.inbox.poll()
                if self.pending:
                    self._run_batch(self._next_batch())
                    self.to_router.send(Stats(0, 0, 0, len(self.pending),
                                              sum(len(p.prompt_ids) for p in self.pending)))
        except BaseException as e:
            try:
                self.to_router.send(Fatal(self.ctx.rank, f"{type(e).__name__}: {e}"[:4000]))
            except Exception:
                pass
            raise

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
        # destination -> (first token, end token) in the flattened batch; (first row, end row)
        tokens: dict[int, tuple[int, int]] = {}
        rows: dict[int, tuple[int, int]] = {}
        tok, row = 0, 0
        for d, group in itertools.groupby(batch, key=lambda p: p.decode_rank):
            group = list(group)
            if d not in self.kv:
                raise ProtocolError(f"Prefill for decode rank {d}: no KV link from "
                                    f"rank {self.ctx.rank} (links: {sorted(self.kv)})")
            n = sum(len(p.prompt_ids) for p in group)
            tokens[d], rows[d] = (tok, tok + n), (row, row + len(group))
            tok, row = tok + n, row + len(group)
            self.kv[d].start([KVEntry(p.req_id, len(p.prompt_ids)) for p in group])

        def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # k, v: [T, kv_heads, head_dim] for the whole batch; slices are contiguous views.
            for d, (a, b) in tokens.items():
                self.kv[d].layer(layer, k[a:b], v[a:b])

        hidden = prefill_hidden(self.model, [list(p.prompt_ids) for p in batch], self.ctx.device,
                                on_layer_kv=on_layer_kv)  # [B, hidden]
        t_computed = time.monotonic()
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


def run(ctx: DistContext) -> None:
    """Entry point for a prefill rank (launch.py)."""
    cfg = ctx.cfg
    dtype = resolve_dtype(cfg.dtype, cfg.device)  # "auto": same answer on every rank (one machine)
    loop = PrefillLoop(ctx, KVShape.of(ModelConfig.from_dir(cfg.model), dtype))
    loop.run(lambda: load_model(cfg.model, dtype, ctx.device)[0])
