"""One streamed OpenAI request -> one `RequestResult` (client clock). TTFT: send -> first content
chunk; ITL: one value per output token after the first, so `sum(itl) == e2el - ttft`
(docs/loadtest.md, Metrics)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pd_local.loadtest.sse import SSEDecoder
from pd_local.loadtest.workloads import RequestSpec

log = logging.getLogger(__name__)

ERROR_BODY_CHARS = 300


@dataclass
class RequestResult:
    """One request's measurements, in seconds (`start` from the run's start, `chunk_times` from the
    send). `success` False on an HTTP error, exception, timeout, error event, early end or no
    content, with `error` saying which."""

    index: int
    kind: str
    input_len: int
    requested_output_len: int
    start: float = 0.0
    success: bool = False
    error: str = ""
    ttft: float | None = None
    e2el: float | None = None
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    server_timings: dict[str, float] = field(default_factory=dict)
    text: str = ""  # the content streamed (what a multi-turn conversation carries forward)
    conversation: int | None = None  # multi-turn workload: which conversation, and its turn
    turn: int | None = None  # (1-based); None for single-request workloads

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1); None for failures and single-token outputs."""
        if not self.success or self.ttft is None or self.e2el is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class RequestOptions:
    """Per-request constants shared by a run."""

    url: str
    model: str
    chat: bool
    api_key: str | None = None
    ignore_eos: bool = False
    timeout: float = 300.0
    extra_body: dict[str, Any] = field(default_factory=dict)


def build_payload(spec: RequestSpec, opts: RequestOptions) -> dict[str, Any]:
    """The JSON body: streamed, with usage, `max_tokens` = the spec's output length."""
    body: dict[str, Any] = {"model": opts.model}
    if opts.chat:
        body["messages"] = spec.messages
    else:
        body["prompt"] = spec.prompt
    body["max_tokens"] = spec.output_len
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body)
    return body


def build_headers(opts: RequestOptions) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if opts.api_key:
        headers["Authorization"] = f"Bearer {opts.api_key}"
    return headers


def token_gaps(chunk_times: list[float], chunk_tokens: list[int], total_tokens: int
               ) -> list[float]:
    """Per-token inter-token latencies from content-chunk arrival times (module docstring)."""
    gaps: list[float] = []
    for k, (t, n) in enumerate(zip(chunk_times, chunk_tokens)):
        if k > 0:
            gaps.append(t - chunk_times[k - 1])
        gaps.extend([0.0] * (n - 1))
    shown = sum(chunk_tokens)
    if total_tokens > shown:
        gaps.extend([0.0] * (total_tokens - shown))
    return gaps


def flatten_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON value, keyed by their dotted path (bools are not numbers)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


def error_message(status: int, body: bytes) -> str:
    """`HTTP <status>: <message>` from an OpenAI-style error body, or its first bytes."""
    text = body.decode("utf-8", errors="replace").strip()
    msg = text
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = str(err.get("message") or err.get("detail") or err)
        elif err is not None:
            msg = str(err)
        elif obj.get("detail") is not None:
            msg = str(obj["detail"])
    if len(msg) > ERROR_BODY_CHARS:
        msg = msg[:ERROR_BODY_CHARS] + "..."
    return f"HTTP {status}: {msg}" if msg else f"HTTP {status}"


def _chunk_text(choice: dict[str, Any], chat: bool) -> str:
    if chat:
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            val = delta.get(key)
            if isinstance(val, str) and val:
                return val
        return ""
    val = choice.get("text")
    return val if isinstance(val, str) else ""


class _Stream:
    """Mutable state of one response while it streams; fills `res` in place so that a timeout
    or a dropped connection keeps what arrived."""

    def __init__(self, res: RequestResult, chat: bool, t_send: float) -> None:
        self.res = res
        self.chat = chat
        self.t_send = t_send
        self.done = False
        self.usage_prompt: int | None = None
        self.usage_completion: int | None = None
        self._cum: int = 0  # tokens accounted for by content chunks so far

    def on_data(self, data: str, event: str, t: float) -> str | None:
        """Handle one event's data; return an error string to stop the stream."""
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            obj = json.loads(data)
        except ValueError:
            return f"malformed SSE data: {data[:100]!r}"
        if not isinstance(obj, dict):
            return f"unexpected SSE data: {data[:100]!r}"
        if event == "error" or obj.get("error") is not None:
            err = obj.get("error", obj)
            msg = err.get("message", err) if isinstance(err, dict) else err
            return f"stream error: {msg}"
        usage = obj.get("usage")
        ct: int | None = None
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                self.usage_prompt = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                ct = usage["completion_tokens"]
                self.usage_completion = ct
        ext = obj.get("pd_local")
        if isinstance(ext, dict) and isinstance(ext.get("timings_ms"), dict):  # not its rank numbers
            self.res.server_timings.update(flatten_numbers({"timings_ms": ext["timings_ms"]}))
        choices = obj.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            if choice.get("finish_reason"):
                self.res.finish_reason = str(choice["finish_reason"])
            text = _chunk_text(choice, self.chat)
            if text:
                self.res.text += text
                n = 1
                if ct is not None and ct > self._cum:
                    n = ct - self._cum
                self._cum += n
                self.res.chunk_times.append(t - self.t_send)
                self.res.chunk_tokens.append(n)
        return None

    def finish(self) -> None:
        """Derive TTFT, E2EL, token count and ITL; decide success if no error was recorded."""
        res = self.res
        if self.usage_prompt is not None:
            res.input_len = self.usage_prompt
        shown = sum(res.chunk_tokens)
        res.output_tokens = self.usage_completion if self.usage_completion is not None else shown
        if res.chunk_times:
            res.ttft = res.chunk_times[0]
            res.e2el = res.chunk_times[-1]
            res.itl = token_gaps(res.chunk_times, res.chunk_tokens, res.output_tokens)
        if res.error:
            return
        if not self.done and res.finish_reason is None:
            res.error = "stream ended before [DONE]"
        elif not res.chunk_times:
            res.error = "no content tokens in the response"
        else:
            res.success = True


async def _stream(client: httpx.AsyncClient, opts: RequestOptions, payload: dict[str, Any],
                  headers: dict[str, str], st: _Stream) -> None:
    async with client.stream("POST", opts.url, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            st.res.error = error_message(resp.status_code, await resp.aread())
            return
        decoder = SSEDecoder()
        # After [DONE] the body is still read to its end (servers close it at once), so that
        # the connection goes back to the pool instead of a new one adding to the next TTFT.
        async for chunk in resp.aiter_bytes():
            if st.done:
                continue
            t = time.perf_counter()
            for ev in decoder.feed(chunk):
                err = st.on_data(ev.data, ev.event, t)
                if err:
                    st.res.error = err
                    return
                if st.done:
                    break
        if st.done:
            return
        t = time.perf_counter()
        for ev in decoder.flush():
            err = st.on_data(ev.data, ev.event, t)
            if err:
                st.res.error = err
                return


STOPPED = "stopped"  # finish_reason of a request ended by the run (`send_request`'s `stop`)


async def _stream_until(stop: asyncio.Event | None, coro: Any, st: _Stream) -> None:
    """Await `coro`; if `stop` is set first, cancel it (closing the connection, as a client
    that has seen enough) and end the request as finished with reason `STOPPED`."""
    if stop is None:
        await coro
        return
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        stopped = not task.done()
        if stopped:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    if not stopped:
        task.result()  # re-raises what the stream raised
    elif not st.res.error and not st.done:
        st.done, st.res.finish_reason = True, STOPPED


async def send_request(client: httpx.AsyncClient, opts: RequestOptions, spec: RequestSpec,
                       index: int, t_run0: float, stop: asyncio.Event | None = None
                       ) -> RequestResult:
    """Send one streamed request and measure it. Never raises (except on cancellation): every
    failure is recorded in the result. `opts.timeout` bounds the whole request. `stop`, when
    given, ends the request early once set: the connection is closed and the request counts as
    finished (finish_reason `STOPPED`) with what it received."""
    res = RequestResult(index=index, kind=spec.kind, input_len=spec.input_len,
                        requested_output_len=spec.output_len)
    payload = build_payload(spec, opts)
    headers = build_headers(opts)
    t_send = time.perf_counter()
    res.start = t_send - t_run0
    st = _Stream(res, opts.chat, t_send)
    try:
        await asyncio.wait_for(_stream_until(stop, _stream(client, opts, payload, headers, st), st),
                               opts.timeout)
    except asyncio.TimeoutError:
        if not st.done:  # a server that keeps the body open after [DONE] is not a failure
            res.error = f"timeout: no complete response within {opts.timeout:g} s"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}" + (
            f" (after {len(res.chunk_times)} content chunks)" if res.chunk_times else "")
    except OSError as e:
        res.error = f"{type(e).__name__}: {e}"
    st.finish()
    if not res.success:
        log.debug("request %d failed: %s", index, res.error)
    return res
