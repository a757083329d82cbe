"""KV + hidden-state transfer over one (prefill, decode) pair: `KVSender` on the prefill rank,
`KVReceiver` threads on the decode rank. On the wire, one transfer per prefill batch and decode
rank (docs/architecture.md):

    KVHeader(entries=[(req_id, num_tokens, start, is_last), ...], shapes, dtype, mode)
    layerwise: per layer K, V [T, kv_heads, head_dim]   whole: KV [L, 2, T, kv_heads, head_dim]
    hidden [R, hidden_size]: the last position of each prompt this completes
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd_local.cluster.dist import KVLink, Link
from pd_local.model.config import ModelConfig
from pd_local.cluster.channel import Inbox, LinkDown, Sender, recv_message
from pd_local.cluster.messages import (DType, Heartbeat, KVEntry, KVHeader, ProtocolError, Shutdown,
                                       TransferMode, TransferRecord)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVShape:
    """The per-token KV geometry both ends must agree on (checked against every header)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype

    @classmethod
    def of(cls, mc: ModelConfig, dtype: torch.dtype) -> KVShape:
        return cls(mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.hidden_size, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def header(self, entries: Sequence[KVEntry], mode: TransferMode) -> KVHeader:
        return KVHeader(tuple(entries), self.num_layers, self.num_kv_heads, self.head_dim,
                        self.hidden_size, DType.of(self.dtype), mode)

    def check(self, h: KVHeader) -> None:
        ours = self.header(h.entries, h.mode)
        if h != ours:
            raise ProtocolError(f"KV header {h} does not match this rank's model {ours}")
        if not h.entries or any(e.num_tokens < 1 or e.start < 0 for e in h.entries):
            raise ProtocolError(f"KV header needs >= 1 entry with >= 1 token each, starting at "
                                f">= 0: {h.entries}")


@dataclass(frozen=True)
class TransferStat:
    """One finished transfer (one batch to one decode rank), as one end saw it."""

    req_ids: tuple[int, ...]
    num_bytes: int
    seconds: float  # sender: start() -> sends done; receiver: header -> hidden landed
    wait_s: float  # time spent blocked at the end (sender: in finish(); receiver: 0)
    t_end: float  # time.monotonic() at completion

    @property
    def bytes_per_s(self) -> float:
        return self.num_bytes / self.seconds if self.seconds > 0 else float("inf")


def _wait_all(works: Sequence[dist.Work], device: torch.device) -> None:
    for w in works:
        w.wait()
    if device.type == "cuda":
        # NCCL's wait() is asynchronous to the host; make completion real before timing it.
        torch.cuda.current_stream(device).synchronize()


class KVSender:
    """The prefill end of one pair, one transfer at a time: start -> layer* -> hidden -> finish.
    Tensors passed in are kept, not copied, until finish() returns: don't modify them before."""

    def __init__(self, pair: KVLink, header: Sender, shape: KVShape, mode: TransferMode) -> None:
        if header.link is not pair.header:
            raise ValueError(f"header sender is on {header.link.name}, pair is {pair.header.name}")
        self.pair, self.header, self.shape, self.mode = pair, header, shape, mode
        self._entries: tuple[KVEntry, ...] | None = None
        self._works: list[dist.Work] = []
        self._keep: list[torch.Tensor] = []  # sent tensors stay alive until their works finish
        self._whole: torch.Tensor | None = None
        self._whole_storage: torch.Tensor | None = None
        self._layers_done = 0
        self._bytes = 0
        self._t0 = 0.0

    @property
    def data(self) -> Link:
        return self.pair.data

    def start(self, entries: Sequence[KVEntry]) -> None:
        if self._entries is not None:
            raise RuntimeError(f"pair {self.data.name}: start() while a transfer is unfinished")
        entries = tuple(entries)
        self.shape.check(self.shape.header(entries, self.mode))
        self._entries, self._layers_done, self._bytes = entries, 0, 0
        self._t0 = time.perf_counter()
        num_tokens = sum(e.num_tokens for e in entries)
        if self.mode is TransferMode.WHOLE:
            s = self.shape
            # [L, 2, T, kv_heads, head_dim], sent in hidden(); grow-only storage, reused
            numel = s.num_layers * 2 * num_tokens * s.num_kv_heads * s.head_dim
            if self._whole_storage is None or self._whole_storage.numel() < numel:
                self._whole_storage = torch.empty(numel, dtype=s.dtype, device=self.data.device)
            self._whole = self._whole_storage[:numel].view(
                s.num_layers, 2, num_tokens, s.num_kv_heads, s.head_dim)

    def _isend(self, t: torch.Tensor) -> None:
        t = t.to(self.data.device).contiguous()  # no-op on the normal path
        self._keep.append(t)
        self._works.append(dist.isend(t, self.data.dst, group=self.data.group))
        self._bytes += t.numel() * t.element_size()

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim], this transfer's tokens in entry order."""
        if self._entries is None:
            raise RuntimeError(f"pair {self.data.name}: layer() before start()")
        if layer != self._layers_done:
            raise RuntimeError(f"pair {self.data.name}: layer {layer} sent, expected "
                               f"{self._layers_done} (layers go in order, each once)")
        s = self.shape
        want = (sum(e.num_tokens for e in self._entries), s.num_kv_heads, s.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != s.dtype:
            raise ValueError(f"pair {self.data.name} layer {layer}: K {list(k.shape)} {k.dtype}, "
                             f"V {list(v.shape)}; expected {list(want)} {s.dtype}")
        if self._whole is not None:
            self._whole[layer, 0].copy_(k)
            self._whole[layer, 1].copy_(v)
        else:
            if layer == 0:
                # With layer 0, not at start(): no receive waits on the embedding (liveness rule 3)
                self.header.send(self.shape.header(self._entries, self.mode))
            self._isend(k)
            self._isend(v)
        self._layers_done += 1

    def hidden(self, hidden: torch.Tensor) -> None:
        """hidden: [R, hidden_size], the last prompt position of each entry with is_last, in
        entry order (R may be 0: called all the same, it ends the transfer's sends)."""
        if self._entries is None or self._layers_done != self.shape.num_layers:
            raise RuntimeError(f"pair {self.data.name}: hidden() after {self._layers_done} of "
                               f"{self.shape.num_layers} layers")
        want = (sum(e.is_last for e in self._entries), self.shape.hidden_size)
        if tuple(hidden.shape) != want or hidden.dtype != self.shape.dtype:
            raise ValueError(f"pair {self.data.name}: hidden {list(hidden.shape)} "
                             f"{hidden.dtype}; expected {list(want)} {self.shape.dtype}")
        if self._whole is not None:
            self.header.send(self.shape.header(self._entries, self.mode))
            self._isend(self._whole)
            self._whole = None
        if want[0]:
            self._isend(hidden)

    def finish(self) -> TransferStat:
        """Wait until every send of the transfer completed; then the tensors are released."""
        if self._entries is None or self._whole is not None or self._layers_done != self.shape.num_layers:
            raise RuntimeError(f"pair {self.data.name}: finish() before hidden()")
        t_wait = time.perf_counter()
        _wait_all(self._works, self.data.device)
        t_end = time.perf_counter()
        stat = TransferStat(tuple(e.req_id for e in self._entries), self._bytes,
                            t_end - self._t0, t_end - t_wait, time.monotonic())
        self._entries, self._works, self._keep = None, [], []
        return stat


@dataclass(frozen=True)
class LayerKV:
    """One layer of one request's prompt KV (positions [start, start + num_tokens)), handed to
    the decode loop."""

    req_id: int
    layer: int
    k: torch.Tensor  # [num_tokens, kv_heads, head_dim], a view into the transfer's staging
    v: torch.Tensor  # [num_tokens, kv_heads, head_dim]
    start: int = 0
    heads: range | None = None  # TP: which of the decode rank's KV heads these are (None: all)


def hand_over_layer(inbox: Inbox, peer: int, h: KVHeader, layer: int, k: torch.Tensor,
                    v: torch.Tensor, heads: range | None = None) -> None:
    """One landed layer of a transfer as LayerKV items, one per entry: k, v [T, kv_heads, head_dim]."""
    a = 0
    for e in h.entries:
        b = a + e.num_tokens
        inbox.put(peer, LayerKV(e.req_id, layer, k[a:b], v[a:b], e.start, heads))
        a = b


def hand_over_hidden(inbox: Inbox, peer: int, h: KVHeader, shape: KVShape, hidden: torch.Tensor,
                     seconds: float, t_end: float) -> None:
    """PromptHidden per entry with is_last (hidden [R, hidden_size]), its record counting the
    bytes of positions [0, end) (the decode loop subtracts the prefix it held)."""
    per_hidden = shape.hidden_size * shape.dtype.itemsize
    row = 0
    for e in h.entries:
        if e.is_last:
            nbytes = (e.start + e.num_tokens) * shape.bytes_per_token + per_hidden
            inbox.put(peer, PromptHidden(e.req_id, hidden[row],
                                         TransferRecord(e.req_id, nbytes, seconds, t_end),
                                         e.cached_tokens))
            row += 1


@dataclass(frozen=True)
class PromptHidden:
    """A request's last item: all its layers were handed over before it."""

    req_id: int
    hidden: torch.Tensor  # [hidden_size]
    record: TransferRecord
    cached_tokens: int = 0  # prompt tokens the prefill rank did not compute (KVEntry's)


@dataclass(frozen=True)
class StagingDone:
    """The last item of a transfer: `release()` once every item is copied, and the staging
    memory serves a later transfer (docs/architecture.md, Staging)."""

    release: Callable[[], None]


class KVReceiver:
    """The decode end of one pair: a header thread reads the header link without pause, a data
    thread lands the announced transfers in order into one flat staging buffer each
    ([L, 2, T, kv_heads, head_dim] then [R, hidden]; POOL kept for reuse) and puts LayerKV /
    PromptHidden / StagingDone into `inbox`. Shutdown ends both; an error puts LinkDown."""

    POOL = 2

    def __init__(self, pair: KVLink, inbox: Inbox, shape: KVShape,
                 out_device: torch.device | None = None, heads: range | None = None) -> None:
        if pair.header.is_sender:
            raise ValueError(f"pair {pair.header.name}: rank {pair.header.rank} is the sender")
        self.pair, self.inbox, self.shape, self.heads = pair, inbox, shape, heads
        self.out_device = out_device or pair.data.device
        self.stats: list[TransferStat] = []
        self._pool: list[torch.Tensor] = []
        self._pool_lock = threading.Lock()  # the thread takes, the consumer gives back
        self._headers: queue.Queue[KVHeader | None] = queue.Queue()
        self.header_thread = threading.Thread(target=self._read_headers, daemon=True,
                                              name=f"kv header {pair.header.name}")
        self.thread = threading.Thread(target=self._run, name=f"kv {pair.data.name}",
                                       daemon=True)
        self.header_thread.start()
        self.thread.start()

    def _fail(self, e: Exception) -> None:
        peer = self.pair.prefill
        log.error("kv link %s down: %s", self.pair.data.name, e)
        self.inbox.fail(peer, LinkDown(f"kv link {self.pair.data.name} (from rank {peer}): {e}"))

    def _read_headers(self) -> None:
        """Reads the header link without pause, also while a transfer is landing: the sender's
        heartbeats on it must never wait for a transfer to end (a gloo send is a rendezvous)."""
        try:
            while True:
                msg = recv_message(self.pair.header)
                if isinstance(msg, Heartbeat):
                    continue
                if isinstance(msg, Shutdown):
                    self._headers.put(None)
                    return
                if not isinstance(msg, KVHeader):
                    raise ProtocolError(f"expected KVHeader, got {type(msg).__name__}")
                self.shape.check(msg)
                self._headers.put(msg)
        except Exception as e:
            self._fail(e)
            self._headers.put(None)

    def _run(self) -> None:
        try:
            while (h := self._headers.get()) is not None:
                self._receive(h)
        except Exception as e:
            self._fail(e)

    def _take(self, numel: int) -> torch.Tensor:
        with self._pool_lock:
            for i, buf in enumerate(self._pool):
                if buf.numel() >= numel:
                    return self._pool.pop(i)
        return torch.empty(numel, dtype=self.shape.dtype, device=self.pair.data.device)

    def _give_back(self, buf: torch.Tensor) -> None:
        with self._pool_lock:
            if len(self._pool) < self.POOL:
                self._pool.append(buf)

    def _irecv(self, t: torch.Tensor) -> dist.Work:
        return dist.irecv(t, self.pair.data.src, group=self.pair.data.group)

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.out_device else t.to(self.out_device)

    def _receive(self, h: KVHeader) -> None:
        t0 = time.perf_counter()
        s, peer, dev = self.shape, self.pair.prefill, self.pair.data.device
        total, n_req = h.num_tokens, h.num_hidden
        kv_numel = s.num_layers * 2 * total * s.num_kv_heads * s.head_dim
        flat = self._take(kv_numel + n_req * s.hidden_size)
        kv = flat[:kv_numel].view(s.num_layers, 2, total, s.num_kv_heads, s.head_dim)
        hidden = flat[kv_numel:kv_numel + n_req * s.hidden_size].view(n_req, s.hidden_size)
        # Post every receive now, in the sender's order; then take them as they complete.
        if h.mode is TransferMode.LAYERWISE:
            layer_works = [(self._irecv(kv[i, 0]), self._irecv(kv[i, 1]))
                           for i in range(s.num_layers)]
        else:
            whole_work = self._irecv(kv)
        hidden_works = [self._irecv(hidden)] if n_req else []  # none when no prompt ends here
        for layer in range(s.num_layers):
            if h.mode is TransferMode.LAYERWISE:
                _wait_all(layer_works[layer], dev)
            elif layer == 0:
                _wait_all([whole_work], dev)
            k, v = self._out(kv[layer, 0]), self._out(kv[layer, 1])  # [T, kv_heads, head_dim]
            hand_over_layer(self.inbox, peer, h, layer, k, v, self.heads)
        _wait_all(hidden_works, dev)
        seconds, t_end = time.perf_counter() - t0, time.monotonic()
        hand_over_hidden(self.inbox, peer, h, s, self._out(hidden), seconds, t_end)
        self.inbox.put(peer, StagingDone(lambda: self._give_back(flat)))
        self.stats.append(TransferStat(tuple(e.req_id for e in h.entries),
                                       total * s.bytes_per_token + n_req * s.hidden_size * s.dtype.itemsize,
                                       seconds, 0.0, t_end))


class Fanout:
    """A prefill TP rank's KV for one decode instance: KVSender's calls, to each decode rank it
    shares KV heads with, each layer cut to their heads (`parts`: (sender, its heads here))."""

    def __init__(self, parts: Sequence[tuple[KVSender, range]]) -> None:
        self.parts = list(parts)

    def start(self, entries: Sequence[KVEntry]) -> None:
        for s, _ in self.parts:
            s.start(entries)

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for s, r in self.parts:
            s.layer(layer, k[:, r.start:r.stop], v[:, r.start:r.stop])

    def hidden(self, hidden: torch.Tensor) -> None:
        for s, _ in self.parts:
            s.hidden(hidden)

    def finish(self) -> None:
        for s, _ in self.parts:
            s.finish()


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
