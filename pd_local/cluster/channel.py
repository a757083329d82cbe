"""Messages over a 2-rank gloo group: `Sender`, `Receiver` (a thread per incoming link feeding an
`Inbox`, since gloo receives cannot be polled) and `Heartbeater`. A message is one frame of
FRAME_WORDS words, plus a second send only when it does not fit. Liveness: docs/architecture.md."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd_local.cluster.dist import Link
from pd_local.cluster.messages import (MAGIC, Heartbeat, Message, ProtocolError, Shutdown, encode,
                                       unpack)

log = logging.getLogger(__name__)

# 256 words = 2 KB: a Tokens message for 60 running sequences or a ~240-token prompt fits in one
# frame. gloo costs ~45 us per send up to a few KB, so a bigger frame only adds copy time.
FRAME_WORDS = 256
MAX_MESSAGE_WORDS = 1 << 26  # 512 MB: anything longer is a corrupt length word


class LinkDown(RuntimeError):
    """A link broke (peer dead, group timeout, garbage on the wire). Raised by Inbox.poll/get."""


@dataclass(frozen=True)
class _Marker:
    error: LinkDown


class Inbox:
    """Where a rank's receiver threads put (peer rank, item) for its loop; a link error arrives as
    a marker, raised in order by poll/get, so a loop never waits on a link that is gone."""

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[int, object]] = queue.Queue()

    def put(self, peer: int, item: object) -> None:
        self._q.put((peer, item))

    def fail(self, peer: int, error: LinkDown) -> None:
        self._q.put((peer, _Marker(error)))

    def get(self, timeout: float | None = None) -> tuple[int, object] | None:
        """Next (peer, item); None after `timeout` seconds (0: do not wait) with nothing."""
        try:
            peer, item = self._q.get(block=timeout != 0, timeout=timeout or None)
        except queue.Empty:
            return None
        if isinstance(item, _Marker):
            raise item.error
        return peer, item

    def poll(self) -> tuple[int, object] | None:
        return self.get(timeout=0)


class Sender:
    """The sending end of a control link. Thread-safe: the rank loop and the Heartbeater share
    it, and a frame and its remainder must not interleave with another message."""

    def __init__(self, link: Link, frame_words: int = FRAME_WORDS) -> None:
        if not link.is_sender:
            raise ValueError(f"link {link.name}: rank {link.rank} is not its sender")
        self.link = link
        self.frame_words = frame_words
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = False

    def send(self, msg: Message) -> None:
        words = encode(msg)
        frame = rest = None
        if self.link.pipe is None:
            n = len(words)
            frame = torch.zeros(self.frame_words, dtype=torch.int64)
            head = min(n, self.frame_words - 1)
            frame[0] = n
            frame[1:1 + head] = torch.tensor(words[:head], dtype=torch.int64)
            rest = torch.tensor(words[head:], dtype=torch.int64) if n > head else None
        with self._lock:
            if self._closed:
                raise LinkDown(f"link {self.link.name}: send of {type(msg).__name__} after "
                               "Shutdown")
            if frame is None:
                self.link.pipe.put(words)  # type: ignore[union-attr]
            else:
                dist.send(frame, self.link.dst, group=self.link.group)
                if rest is not None:
                    dist.send(rest, self.link.dst, group=self.link.group)
            self._last = time.monotonic()
            if isinstance(msg, Shutdown):
                self._closed = True

    def close(self) -> None:
        """Send Shutdown (the receiver thread exits after it); idempotent."""
        if not self._closed:
            self.send(Shutdown())

    def heartbeat_if_idle(self, idle_s: float) -> None:
        with self._lock:
            due = not self._closed and time.monotonic() - self._last >= idle_s
        if due:
            try:
                self.send(Heartbeat())
            except LinkDown:
                pass  # closed in between: nothing left to keep alive


def recv_message(link: Link, frame_words: int = FRAME_WORDS) -> Message:
    """Blocking receive of one message on `link` (the receiving end)."""
    if link.pipe is not None:
        return unpack(torch.tensor(link.pipe.get(), dtype=torch.int64))
    frame = torch.empty(frame_words, dtype=torch.int64)
    dist.recv(frame, link.src, group=link.group)
    n, first = int(frame[0]), int(frame[1])
    if not 0 < n <= MAX_MESSAGE_WORDS or first & ~0xFFFF != MAGIC:
        raise ProtocolError(f"link {link.name}: frame does not start a message (length word "
                            f"{n}, word 1 = {first:#x})")
    head = min(n, frame_words - 1)
    words = frame[1:1 + head]
    if n > head:
        rest = torch.empty(n - head, dtype=torch.int64)
        dist.recv(rest, link.src, group=link.group)
        words = torch.cat([words, rest])
    return unpack(words)


class Receiver:
    """A daemon thread receiving on one link into an Inbox as (peer, message), heartbeats dropped;
    it exits after a Shutdown, or after putting LinkDown when a receive fails."""

    def __init__(self, link: Link, inbox: Inbox, frame_words: int = FRAME_WORDS) -> None:
        if link.is_sender:
            raise ValueError(f"link {link.name}: rank {link.rank} is its sender, not receiver")
        self.link, self.inbox, self.frame_words = link, inbox, frame_words
        self.thread = threading.Thread(target=self._run, name=f"recv {link.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        peer = self.link.src
        while True:
            try:
                msg = recv_message(self.link, self.frame_words)
            except Exception as e:  # gloo raises RuntimeError subclasses; ProtocolError too
                log.error("link %s down: %s", self.link.name, e)
                self.inbox.fail(peer, LinkDown(f"link {self.link.name} (from rank {peer}): {e}"))
                return
            if isinstance(msg, Heartbeat):
                continue
            self.inbox.put(peer, msg)
            if isinstance(msg, Shutdown):
                return


class Heartbeater:
    """A daemon thread per outgoing control link, sending a Heartbeat whenever the link has been
    idle for `interval` s. One per link: a gloo send is a rendezvous, and one thread walking
    every link let a slow one starve the rest (docs/design.md). A send error goes to `inbox` as
    LinkDown."""

    def __init__(self, senders: Iterable[Sender], interval: float, inbox: Inbox) -> None:
        self.senders = list(senders)
        self.interval = interval
        self.inbox = inbox
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True,
                                         name=f"heartbeat {s.link.name}") for s in self.senders]
        for t in self.threads:
            t.start()

    def _run(self, sender: Sender) -> None:
        # Wake twice per interval so the link goes at most ~1.5 intervals without traffic.
        while not self._stop.wait(self.interval / 2):
            try:
                sender.heartbeat_if_idle(self.interval)
            except Exception as e:
                self.inbox.fail(sender.link.dst, LinkDown(f"heartbeat on {sender.link.name}: {e}"))
                return

    def stop(self) -> None:
        """Stop every thread. A thread caught in a send to a peer that stopped reading is left
        behind (a daemon; its send fails at the group timeout) rather than waited for."""
        self._stop.set()
        for t in self.threads:
            t.join(timeout=self.interval)
