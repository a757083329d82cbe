"""A byte-level SSE decoder: fed chunks as they arrive, it returns the events each completed, so
an event is timed by its last bytes. Hand-written because httpx-sse drops an event cut off by the
stream's end, holds a chunk-final CR and only decodes whole responses."""

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
