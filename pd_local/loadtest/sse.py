"""A byte-level Server-Sent Events decoder (the subset OpenAI-style streams use).

Fed raw network chunks in arrival order, it returns the events that each chunk completed, so
the caller can timestamp an event with the arrival of the bytes that finished it. Lines end with
LF, CRLF or CR (a CRLF split across two chunks is one line end); comment lines (`:`, e.g.
sse-starlette's pings) and the `id`/`retry` fields are ignored; multi-line `data` is joined with
LF, as the SSE specification says.

Why not httpx-sse: it was tried (0.4.3) and is worse at this job. It drops an event the stream
was cut in the middle of (`data: tail` with no blank line: the load tester must still see it);
it only decodes a whole response (`EventSource.aiter_sse`), so feeding chunks and timestamping
each event by the arrival of its last bytes would need its private `_decoders` module; it holds
a line whose CR ends a chunk until the next chunk arrives, delaying that event's timestamp; and
it refuses any response whose Content-Type is not text/event-stream.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its `event` field ("message" when absent) and its data."""

    event: str
    data: str


class SSEDecoder:
    """Incremental decoder; one instance per response. Not thread-safe."""

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # the previous chunk ended with CR: a leading LF is its pair
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume `chunk`; return the events completed by it (possibly none)."""
        if not chunk:
            return []
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = chunk.endswith(b"\r")
        buf = self._buf + chunk
        events: list[SSEEvent] = []
        start = 0
        n = len(buf)
        i = 0
        while i < n:
            c = buf[i]
            if c == 0x0A or c == 0x0D:  # LF or CR
                line = buf[start:i]
                if c == 0x0D and i + 1 < n and buf[i + 1] == 0x0A:
                    i += 1
                start = i + 1
                ev = self._line(line.decode("utf-8", errors="replace"))
                if ev is not None:
                    events.append(ev)
            i += 1
        self._buf = buf[start:]
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent(self._event or "message", "\n".join(self._data))
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch a final event that lacked its blank line (lenient: some
        servers close right after the last `data:` line)."""
        events: list[SSEEvent] = []
        if self._buf:
            ev = self._line(self._buf.decode("utf-8", errors="replace"))
            self._buf = b""
            if ev is not None:
                events.append(ev)
        ev = self._line("")
        if ev is not None:
            events.append(ev)
        return events
