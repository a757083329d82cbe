"""KV transfer through a shared slot for a pair on one device, with transfer.py's contract. The
prefill rank copies K, V and hidden into its slot ([L, 2, T, kv, hd] + [R, hidden]; CUDA IPC, or
a /dev/shm file on CPU), records an event and announces it; the decode rank copies it out and
acks, which `finish()` awaits before the slot is reused."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd_local.cluster.channel import Inbox, Sender
from pd_local.cluster.dist import DistContext, KVLink, device_for_rank
from pd_local.cluster.ipc import KVTransport, SharedTensor, pack_bytes, pair_transport, unpack_bytes
from pd_local.cluster.messages import KVEntry, KVHeader, TransferMode
from pd_local.cluster.transfer import (Fanout, KVReceiver, KVSender, KVShape, StagingDone, TransferStat,
                                       hand_over_hidden, hand_over_layer)

log = logging.getLogger(__name__)

GROW = 1.25  # a slot grows to 1.25x what the transfer needs: fewer re-announcements


@dataclass
class _Slot:
    """The sender's staging memory and what the receiver needs to open it."""

    flat: torch.Tensor  # [capacity] in the model dtype
    announce: list[int]  # int64 words: the memory's handle, then the event's (CUDA) or path
    event: torch.cuda.Event | None
    path: str | None  # CPU: the /dev/shm file until the receiver has mapped it


def _new_slot(numel: int, dtype: torch.dtype, device: torch.device) -> _Slot:
    if device.type == "cuda":
        flat = torch.empty(numel, dtype=dtype, device=device)
        event = torch.cuda.Event(interprocess=True)
        words = SharedTensor.export(flat).to_wire().tolist()
        return _Slot(flat, [len(words), *words, *pack_bytes(event.ipc_handle())], event, None)
    fd, path = tempfile.mkstemp(prefix="pd_local_kv_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.close(fd)
    flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    code = [torch.bfloat16, torch.float32].index(dtype)
    return _Slot(flat, [-1, code, numel, *pack_bytes(path.encode())], None, path)


def _open_slot(words: list[int], device: torch.device
               ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """The receiver's view of an announced slot (and the event its contents are ordered by)."""
    if words[0] >= 0:  # CUDA: [len, SharedTensor words..., event bytes]
        n = words[0]
        flat = SharedTensor.from_wire(torch.tensor(words[1:1 + n])).open()
        handle, _ = unpack_bytes(words, 1 + n)
        return flat, torch.cuda.Event.from_ipc_handle(device, handle)
    dtype = [torch.bfloat16, torch.float32][words[1]]
    path, _ = unpack_bytes(words, 3)
    return torch.from_file(path.decode(), shared=True, size=words[2], dtype=dtype), None


class IpcKVSender:
    """The prefill end of a same-device pair; the calls and their order are KVSender's:
    start -> layer (each layer, in order) -> hidden -> finish. One transfer at a time."""

    def __init__(self, pair: KVLink, header: Sender, shape: KVShape, mode: TransferMode,
                 device: torch.device) -> None:
        if header.link is not pair.header:
            raise ValueError(f"header sender is on {header.link.name}, pair is {pair.header.name}")
        self.pair, self.header, self.shape, self.mode = pair, header, shape, mode
        self.device = device
        self._slot: _Slot | None = None
        self._announce = False  # the slot changed since the receiver last opened it
        self._entries: tuple[KVEntry, ...] | None = None
        self._kv: torch.Tensor | None = None  # [L, 2, T, kv_heads, head_dim] view of the slot
        self._hidden: torch.Tensor | None = None  # [R, hidden] view of the slot
        self._layers_done = 0
        self._sent = False
        self._opened = False
        self._t0 = 0.0

    @property
    def busy(self) -> bool:
        return self._entries is not None

    def start(self, entries: Sequence[KVEntry]) -> None:
        if self._entries is not None:
            raise RuntimeError(f"pair {self.pair.data.name}: start() while a transfer is unfinished")
        entries = tuple(entries)
        self.shape.check(self.shape.header(entries, self.mode))
        s = self.shape
        t = sum(e.num_tokens for e in entries)
        kv_numel = s.num_layers * 2 * t * s.num_kv_heads * s.head_dim
        n_hidden = sum(e.is_last for e in entries)  # rows of hidden: entries that end a prompt
        need = kv_numel + n_hidden * s.hidden_size
        if self._slot is None or self._slot.flat.numel() < need:
            self._drop_slot()
            self._slot = _new_slot(int(need * GROW), s.dtype, self.device)
            self._announce = True
        flat = self._slot.flat
        self._kv = flat[:kv_numel].view(s.num_layers, 2, t, s.num_kv_heads, s.head_dim)
        self._hidden = flat[kv_numel:need].view(n_hidden, s.hidden_size)
        self._entries, self._layers_done, self._sent = entries, 0, False
        self._t0 = time.perf_counter()

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim], this transfer's tokens in entry order."""
        if self._entries is None:
            raise RuntimeError(f"pair {self.pair.data.name}: layer() before start()")
        if layer != self._layers_done:
            raise RuntimeError(f"pair {self.pair.data.name}: layer {layer} sent, expected "
                               f"{self._layers_done} (layers go in order, each once)")
        want = tuple(self._kv.shape[2:])
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.shape.dtype:
            raise ValueError(f"pair {self.pair.data.name} layer {layer}: K {list(k.shape)} "
                             f"{k.dtype}, V {list(v.shape)}; expected {list(want)} {self.shape.dtype}")
        self._kv[layer, 0].copy_(k)  # device to device, on the stream that computed k
        self._kv[layer, 1].copy_(v)
        self._layers_done += 1

    def hidden(self, hidden: torch.Tensor) -> None:
        """hidden: [R, hidden_size] (R = entries with is_last, maybe 0); then the transfer is
        announced to the receiver."""
        if self._entries is None or self._layers_done != self.shape.num_layers:
            raise RuntimeError(f"pair {self.pair.data.name}: hidden() after {self._layers_done} "
                               f"of {self.shape.num_layers} layers")
        if tuple(hidden.shape) != tuple(self._hidden.shape) or hidden.dtype != self.shape.dtype:
            raise ValueError(f"pair {self.pair.data.name}: hidden {list(hidden.shape)} "
                             f"{hidden.dtype}; expected {list(self._hidden.shape)} {self.shape.dtype}")
        self._hidden.copy_(hidden)
        slot = self._slot
        if slot.event is not None:
            slot.event.record()  # the receiver's stream waits on it: no host sync here
        self.header.send(self.shape.header(self._entries, self.mode))
        announce = slot.announce if self._announce else []
        data = self.pair.data
        dist.send(torch.tensor([len(announce)], dtype=torch.int64), data.dst, group=data.group)
        if announce:
            dist.send(torch.tensor(announce, dtype=torch.int64), data.dst, group=data.group)
        self._opened = self._announce  # finish(): the receiver has it mapped once it acks
        self._announce = False
        self._sent = True

    def finish(self) -> TransferStat:
        """Wait for the receiver's ack (it has copied the slot); the slot may then be reused."""
        if self._entries is None or not self._sent:
            raise RuntimeError(f"pair {self.pair.data.name}: finish() before hidden()")
        t_wait = time.perf_counter()
        ack = torch.zeros(1, dtype=torch.int64)
        dist.recv(ack, self.pair.data.dst, group=self.pair.data.group)
        t_end = time.perf_counter()
        if self._opened and self._slot.path is not None:
            # both ranks have the file mapped now: unlink it, so a crash leaves nothing behind
            os.unlink(self._slot.path)
            self._slot.path = None
        s = self.shape
        nbytes = (self._kv.numel() + self._hidden.numel()) * s.dtype.itemsize
        stat = TransferStat(tuple(e.req_id for e in self._entries), nbytes, t_end - self._t0,
                            t_end - t_wait, time.monotonic())
        self._entries = self._kv = self._hidden = None
        return stat

    def _drop_slot(self) -> None:
        if self._slot is not None and self._slot.path is not None:
            os.unlink(self._slot.path)  # never announced, or never acked
        self._slot = None

    def close(self) -> None:
        """Release the slot (call after the last finish)."""
        self._drop_slot()


class IpcKVReceiver(KVReceiver):
    """The decode end of a same-device pair: KVReceiver with the payload read from the
    sender's slot. Items in the inbox are KVReceiver's, in the same order."""

    def __init__(self, pair: KVLink, inbox: Inbox, shape: KVShape, device: torch.device) -> None:
        self._device = device
        self._shared: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        super().__init__(pair, inbox, shape, out_device=device)

    def _take(self, numel: int) -> torch.Tensor:  # staging on the device, not the data link's
        with self._pool_lock:
            for i, buf in enumerate(self._pool):
                if buf.numel() >= numel:
                    return self._pool.pop(i)
        return torch.empty(numel, dtype=self.shape.dtype, device=self._device)

    def _receive(self, h: KVHeader) -> None:
        t0 = time.perf_counter()
        s, peer, data = self.shape, self.pair.prefill, self.pair.data
        n_words = torch.zeros(1, dtype=torch.int64)
        dist.recv(n_words, data.src, group=data.group)
        if int(n_words) > 0:
            words = torch.zeros(int(n_words), dtype=torch.int64)
            dist.recv(words, data.src, group=data.group)
            self._shared, self._event = _open_slot(words.tolist(), self._device)
        if self._shared is None:
            raise RuntimeError(f"pair {data.name}: a transfer before any slot was announced")
        total, n_req = h.num_tokens, h.num_hidden
        kv_numel = s.num_layers * 2 * total * s.num_kv_heads * s.head_dim
        need = kv_numel + n_req * s.hidden_size
        flat = self._take(need)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(self._event)  # the sender's copies, GPU-side
                flat[:need].copy_(self._shared[:need])
                done = torch.cuda.Event()
                done.record()
            done.synchronize()  # this is the transfer's own thread; the decode loop never waits
        else:
            flat[:need].copy_(self._shared[:need])
        dist.send(torch.ones(1, dtype=torch.int64), data.src, group=data.group)  # the ack
        kv = flat[:kv_numel].view(s.num_layers, 2, total, s.num_kv_heads, s.head_dim)
        hidden = flat[kv_numel:need].view(n_req, s.hidden_size)
        for layer in range(s.num_layers):
            hand_over_layer(self.inbox, peer, h, layer, kv[layer, 0], kv[layer, 1])
        seconds, t_end = time.perf_counter() - t0, time.monotonic()
        hand_over_hidden(self.inbox, peer, h, s, hidden, seconds, t_end)
        self.inbox.put(peer, StagingDone(lambda: self._give_back(flat)))
        self.stats.append(TransferStat(tuple(e.req_id for e in h.entries),
                                       total * s.bytes_per_token + n_req * s.hidden_size * s.dtype.itemsize,
                                       seconds, 0.0, t_end))


def _pair_devices(ctx: DistContext, pair: KVLink) -> tuple[torch.device, torch.device]:
    count = torch.cuda.device_count() if ctx.cfg.device == "cuda" else 0
    return (device_for_rank(pair.prefill, ctx.cfg.device, count),
            device_for_rank(pair.decode, ctx.cfg.device, count))


def _ipc_devices(ctx: DistContext, pair: KVLink) -> tuple[torch.device, torch.device] | None:
    """(prefill, decode) devices where the pair moves KV through CUDA IPC (one GPU, cfg.kv_ipc;
    never an NCCL pair, e.g. two hosts' GPUs of one index), else None."""
    devs = _pair_devices(ctx, pair)
    if pair.data.backend != "nccl" and pair_transport(*devs, ctx.cfg.kv_ipc) is KVTransport.CUDA_IPC:
        return devs
    return None


def kv_sender(ctx: DistContext, pair: KVLink, shape: KVShape, mode: TransferMode
              ) -> KVSender | IpcKVSender:
    """The prefill end for `pair`: through CUDA IPC where both ranks share a GPU (and
    cfg.kv_ipc), else KVSender over the data link."""
    if (devs := _ipc_devices(ctx, pair)) is not None:
        return IpcKVSender(pair, Sender(pair.header), shape, mode, devs[0])
    return KVSender(pair, Sender(pair.header), shape, mode)


def kv_receiver(ctx: DistContext, pair: KVLink, inbox: Inbox, shape: KVShape, heads: range | None = None
                ) -> KVReceiver | IpcKVReceiver:
    """The decode end for `pair`, matching kv_sender's choice on the prefill rank."""
    if (devs := _ipc_devices(ctx, pair)) is not None:
        return IpcKVReceiver(pair, inbox, shape, devs[1])
    return KVReceiver(pair, inbox, shape, out_device=ctx.device, heads=heads)


def kv_ends(ctx: DistContext, shape: KVShape, inbox: Inbox, mode: TransferMode
            ) -> tuple[dict[int, KVSender | IpcKVSender | Fanout], list[KVReceiver], list[KVSender]]:
    """This rank's KV ends: senders by decode target (a decode instance's leader; with TP a
    Fanout to the ranks sharing heads with this one), receivers, and every sender, flat."""
    me, topo = ctx.rank, ctx.topology
    slices = topo.slices

    def cut(p: int, d: int) -> KVShape:
        return dataclasses.replace(shape, num_kv_heads=len(slices[(p, d)].heads)) if slices else shape

    out: dict[int, KVSender | IpcKVSender | Fanout] = {}
    parts: dict[int, list[tuple[KVSender, range]]] = {}
    flat: list[KVSender] = []
    for (p, d), pair in ctx.links.kv.items():
        if p == me:
            flat.append(sender := kv_sender(ctx, pair, cut(p, d), mode))
            if slices:
                parts.setdefault(topo.instance(d)[0], []).append((sender, slices[(p, d)].src))
            else:
                out[d] = sender
    out.update((d, Fanout(ps)) for d, ps in parts.items())
    ins = [kv_receiver(ctx, pair, inbox, cut(p, d), slices[(p, d)].dst if slices else None)
           for (p, d), pair in ctx.links.kv.items() if p != me]
    return out, ins, flat
