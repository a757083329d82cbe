"""One request's life on the front-end: backend outputs -> text deltas -> OpenAI objects, streamed
(SSE) or whole; a client that goes away becomes `backend.abort(req_id)`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pd_local.api.backend import RequestOutput
from pd_local.api.logprob_format import chat_logprobs, completion_logprobs
from pd_local.api.openai_request import GenerationRequest, RequestError
from pd_local.api.textstream import TextStream
from pd_local.engine.logprobs import Logprob
from pd_local.engine.scheduler import FinishReason

if TYPE_CHECKING:
    from pd_local.api.server import App


def error_response(err: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


class Generation:
    """One request's life on the front-end: outputs -> text deltas -> OpenAI objects."""

    def __init__(self, app: App, req: GenerationRequest, req_id: int, outputs: asyncio.Queue[RequestOutput]) -> None:
        self.app = app
        self.req = req
        self.req_id = req_id
        self.outputs = outputs
        self.text = TextStream(app.tokenizer, req.stop)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.timings: dict[str, float] | None = None
        self.ranks: tuple[int | None, int | None] = (None, None)  # (prefill, decode)
        self.cached_tokens = 0
        self.done = False
        self.index = 0  # the choice's index in its response
        self.group = 0  # its prompt's index (n > 1: n choices of one prompt share it)
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.t_start = time.monotonic()
        self.t_last: float | None = None
        self.new_tokens: list[tuple[int, Logprob | None]] = []  # since the last logprobs()
        self.prompt_lps: tuple[Logprob, ...] | None = None
        self.text_offset = 0  # completions' text_offset of the next token

    async def next_delta(self) -> str | None:
        """Wait for the next backend output; returns its text delta, None once finished."""
        if self.done:
            return None
        out = await self.outputs.get()
        now = time.monotonic()
        m = self.app.metrics
        if out.token_ids:
            if self.t_last is None:
                m.observe_ttft(now - self.t_start)
            else:
                m.observe_itl(now - self.t_last)
            self.t_last = now
        delta = ""
        lps = out.logprobs or [None] * len(out.token_ids)
        for tok, lp in zip(out.token_ids, lps):
            if self.text.stopped or self.req.score_only:  # score_only: its one token is dropped
                break
            self.completion_tokens += 1
            self.new_tokens.append((tok, lp))
            delta += self.text.push(tok)
        if out.prompt_logprobs is not None:
            self.prompt_lps = out.prompt_logprobs
        if out.cached_tokens:  # known from the first token on (a stop string may end it early)
            self.cached_tokens = out.cached_tokens
        if out.finished:
            self.ranks = (out.prefill_rank, out.decode_rank)
        if out.error is not None:
            self._finish(FinishReason.ERROR, out.timings_ms)
            raise RuntimeError(out.error)
        if self.text.stopped:
            if not out.finished:  # free its blocks; its final output brings the timings
                self.app.backend.abort(self.req_id)
                while not out.finished:
                    out = await self.outputs.get()
                self.ranks = (out.prefill_rank, out.decode_rank)
            self._finish(FinishReason.STOP, out.timings_ms)
        elif out.finished:
            delta += self.text.finish()
            self._finish(FinishReason.LENGTH if self.req.score_only else out.finish_reason or FinishReason.STOP,
                         out.timings_ms)
        return delta

    def _finish(self, reason: FinishReason, timings: dict[str, float] | None) -> None:
        if self.done:
            return
        self.done = True
        self.finish_reason = FinishReason.STOP if reason is FinishReason.ABORT else reason
        self.timings = timings or {}
        self.app.in_flight -= 1
        m = self.app.metrics
        m.count_request(reason)
        m.observe_e2e(time.monotonic() - self.t_start)

    def abandon(self) -> None:
        """The client went away before the end: abort on every rank, count it once."""
        if not self.done:
            self.app.backend.abort(self.req_id)
            self._finish(FinishReason.ABORT, None)
            self.app.metrics.count_disconnect()

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens whose KV
        came from a prefix cache (in PD, the prefill rank's: the tokens it did not compute)."""
        p = len(self.req.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens, "total_tokens": p + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def extension(self) -> dict[str, Any]:
        """The `pd_local` object of the last chunk or the whole response."""
        return {"timings_ms": self.timings, "prefill_rank": self.ranks[0], "decode_rank": self.ranks[1]}

    def logprobs(self, echo: bool = False) -> dict[str, Any] | None:
        """The logprobs object of the tokens since the last call (None when not asked); `echo`:
        the prompt's tokens first (completions; the first has none)."""
        req, tok = self.req, self.app.tokenizer
        if req.logprobs is None:
            return None
        new, self.new_tokens = self.new_tokens, []
        if req.kind == "chat":
            return {"content": chat_logprobs(tok, [lp for _, lp in new if lp is not None]), "refusal": None}
        ids, lps = [t for t, _ in new], [lp for _, lp in new]
        if echo:
            if self.prompt_lps is None or len(self.prompt_lps) != len(req.prompt_ids) - 1:
                raise RuntimeError("the prompt's logprobs did not come back with the request")
            ids, lps = req.prompt_ids + ids, [None, *self.prompt_lps, *lps]
        out = completion_logprobs(tok, ids, lps, self.text_offset)
        if out["tokens"]:
            self.text_offset = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def _chunk(self, delta: dict[str, Any] | str | None, finish: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.req.kind == "chat":
            choice = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": self.index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.app.settings.model_name,
                "choices": [choice]}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """This choice's stream chunks, its last with finish_reason (and its `pd_local` unless a
        usage chunk follows); an error ends it with an `error` object."""
        if self.req.kind == "chat":
            yield self._chunk({"role": "assistant", "content": ""}, None)
        first = True
        while True:
            try:
                delta = await self.next_delta()
                if delta is None:
                    return
                echo, first = first and self.req.echo is not None, False
                delta = (self.req.echo or "") + delta if echo else delta
                asked = self.new_tokens and self.req.logprobs is not None
                lps = self.logprobs(echo) if delta or echo or asked else None
            except RuntimeError as e:
                yield {"error": {"message": str(e), "type": "server_error", "param": None, "code": "generation_failed"}}
                return
            if delta or echo or asked:
                yield self._chunk({"content": delta} if self.req.kind == "chat" else delta, None, lps)
            if self.done:
                last = self._chunk({} if self.req.kind == "chat" else "", self.finish_reason)
                yield last if self.req.include_usage else {**last, "pd_local": self.extension()}
                return

    async def whole_response(self, request: Request) -> Response:
        done = await self.whole(request)
        if isinstance(done, Response):
            return done
        return JSONResponse({
            "id": self.id, "object": "chat.completion" if self.req.kind == "chat" else "text_completion",
            "created": self.created, "model": self.app.settings.model_name,
            "choices": [done], "usage": self.usage(), "pd_local": self.extension(),
        })

    async def whole(self, request: Request) -> dict[str, Any] | Response:
        """Run to the end: the choice (index 0), or the Response to send instead (an error, or
        499 when the client went away)."""
        parts: list[str] = []
        try:
            while not self.done:
                task = asyncio.ensure_future(self.next_delta())
                while not task.done():
                    await asyncio.wait({task}, timeout=self.app.settings.disconnect_poll_s)
                    if not task.done() and await request.is_disconnected():
                        task.cancel()
                        self.abandon()
                        return Response(status_code=499)
                delta = task.result()
                if delta:
                    parts.append(delta)
            lps = self.logprobs(echo=self.req.echo is not None)
        except RuntimeError as e:
            return error_response(RequestError(str(e), code="generation_failed", status=500, type="server_error"))
        finally:
            self.abandon()
        text = (self.req.echo or "") + "".join(parts)
        if self.req.kind == "chat":
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                    "finish_reason": self.finish_reason}
        return {"index": 0, "text": text, "logprobs": lps, "finish_reason": self.finish_reason}


async def whole_batch(gens: list[Generation], request: Request) -> Response:
    """Several choices of one request, run at once (a batch of prompts, n per prompt): usage
    counts each prompt once; `pd_local` holds each prompt's extension under `choices`."""
    done = await asyncio.gather(*(g.whole(request) for g in gens))  # each abandons itself at its end
    for d in done:
        if isinstance(d, Response):
            return d
    total = total_usage(gens)
    first = gens[0]
    return JSONResponse({
        "id": first.id, "object": "chat.completion" if first.req.kind == "chat" else "text_completion",
        "created": first.created,
        "model": first.app.settings.model_name,
        "choices": [{**d, "index": g.index} for g, d in zip(gens, done)],  # type: ignore[dict-item]
        "usage": total, "pd_local": {"choices": [g.extension() for g in gens]},
    })


async def sse_events(gens: list[Generation]) -> AsyncIterator[dict[str, str]]:
    """One SSE stream of every choice's chunks as they come (each with its index), then the
    usage chunk (include_usage: summed, with the `pd_local` extension) and [DONE]. An error in
    one choice ends the stream after its error event; the others are aborted."""
    merged: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def pump(g: Generation) -> None:
        try:
            async for chunk in g.chunks():
                await merged.put(chunk)
        finally:
            await merged.put(None)

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        running = len(gens)
        while running:
            chunk = await merged.get()
            if chunk is None:
                running -= 1
                continue
            yield {"data": json.dumps(chunk)}
            if "error" in chunk:
                break
        else:
            if gens[0].req.include_usage:
                first = gens[0]
                ext = first.extension() if len(gens) == 1 else {"choices": [g.extension() for g in gens]}
                chunk = {**first._chunk(None, None), "choices": [], "usage": total_usage(gens), "pd_local": ext}
                yield {"data": json.dumps(chunk)}
        yield {"data": "[DONE]"}
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            g.abandon()  # no-op when finished; a disconnect lands here via cancellation


def total_usage(gens: list[Generation]) -> dict[str, Any]:
    """The usage of several choices together: each prompt once (its first choice's prefix
    hit), every choice's completion tokens."""
    firsts = {g.group: g.usage() for g in reversed(gens)}.values()
    prompt = sum(u["prompt_tokens"] for u in firsts)
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"]
                                                           for u in firsts)}}
