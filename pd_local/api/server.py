"""The OpenAI-compatible HTTP front-end (rank 0): routes, validation, admission, metrics; each
request's life is a `generation.Generation`. It never blocks its asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pd_local.api.backend import Backend
from pd_local.api.cluster import RateMeter, cluster_view
from pd_local.api.metrics import Metrics
from pd_local.api.openai_request import RequestError, parse_request, split_prompts
from pd_local.api.generation import Generation, error_response, sse_events, whole_batch
from pd_local.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"  # the web page: no build step, no CDN


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_queue: int = 256  # requests admitted and not yet finished; past it: 429
    retry_after_s: int = 1
    cors_origins: tuple[str, ...] = ()
    disconnect_poll_s: float = 0.25  # non-streaming requests check the client this often
    dtype: str | None = None  # what the workers compute in ("auto" resolved), for /v1/models


MODE_ANSWER_S = 10.0  # POST /v1/cluster/mode waits this long for the router thread


class App:
    """Holds the per-server state the route handlers share."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, settings: ServerSettings) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = Metrics()
        self.in_flight = 0
        self._ids = itertools.count(1)
        self.rates = RateMeter()
        self.started = int(time.time())  # the models' `created`

    # -- helpers ---------------------------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key", status=401, type="authentication_error",
            )

    async def _read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                               code="request_too_large", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body exceeds the limit of {limit} bytes",
                                   code="request_too_large", status=413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # -- routes ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        try:
            self._check_auth(request)
            ok, why = self.backend.healthy()
            if not ok:
                # A failed rank or a stop in progress: say so at once (load balancers retry
                # elsewhere on 503), rather than queueing work that can never run.
                raise RequestError(f"server unavailable: {why}", code="unavailable",
                                   status=503, type="server_error")
            body = await self._read_json(request)
            reqs = [parse_request(b, kind, self.tokenizer, self.backend.max_model_len,  # type: ignore[arg-type]
                                  (self.settings.model_name,))
                    for b in (split_prompts(body) if kind == "completion" else [body])]
            if self.in_flight + sum(r.n for r in reqs) > self.settings.max_queue:
                self.metrics.count_request("rejected")
                raise RequestError(
                    f"server overloaded: {self.in_flight} requests in flight (limit {self.settings.max_queue}); retry later",
                    code="rate_limit_exceeded", status=429, type="rate_limit_error",
                )
        except RequestError as e:
            if e.status == 503:
                self.metrics.count_request("rejected")
            elif e.status != 429:
                self.metrics.count_request("invalid")
            retry = e.status in (429, 503)
            headers = {"Retry-After": str(self.settings.retry_after_s)} if retry else None
            return error_response(e, headers)
        gens: list[Generation] = []
        for group, req in enumerate(reqs):  # prompt i's choices are i * n .. i * n + n - 1
            req_ids = [next(self._ids) for _ in range(req.n)]
            try:
                outputs = self.backend.submit_n(req_ids, req.prompt_ids, req.params)
            except Exception:
                for g in gens:
                    g.abandon()
                raise
            for req_id, out in zip(req_ids, outputs):
                self.in_flight += 1
                gens.append(Generation(self, req, req_id, out))
                g = gens[-1]
                g.index, g.group, g.id, g.created = len(gens) - 1, group, gens[0].id, gens[0].created
        if reqs[0].stream:
            return EventSourceResponse(sse_events(gens), sep="\n", ping=15)
        if len(gens) == 1:
            return await gens[0].whole_response(request)
        return await whole_batch(gens, request)

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except RequestError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{id}: the served model's card, or 404 naming what is served."""
        try:
            self._check_auth(request)
            name = request.path_params["model_id"]
            if name != self.settings.model_name:
                raise RequestError(f"model {name!r} does not exist; served: {self.settings.model_name}",
                                   "model", code="model_not_found", status=404)
        except RequestError as e:
            return error_response(e)
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.started,
                "owned_by": "pd_local", "max_model_len": self.backend.max_model_len,
                "pd_local": {"dtype": self.settings.dtype}}

    async def cluster(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except RequestError as e:
            return error_response(e)
        ok, why = self.backend.healthy()
        return JSONResponse(cluster_view(self.backend.stats(), self.rates, model=self.settings.model_name,
                                         healthy=ok, detail=why, in_flight=self.in_flight))

    async def set_mode(self, request: Request) -> Response:
        """POST /v1/cluster/mode {"rank": r, "mode": "mixed" | "prefill" | "decode" | "auto"}."""
        try:
            self._check_auth(request)
            body = await self._read_json(request)
            rank, mode = (body.get("rank"), body.get("mode")) if isinstance(body, dict) else (None, None)
            if type(rank) is not int or not isinstance(mode, str):
                raise RequestError('expected {"rank": <int>, "mode": "mixed" | "prefill" | "decode" | "auto"}',
                                   code="invalid_request")
            try:  # the router applies it, in order with other changes, or refuses it
                await asyncio.wait_for(asyncio.wrap_future(self.backend.set_mode(rank, mode)), MODE_ANSWER_S)
            except ValueError as e:
                raise RequestError(str(e), code="invalid_mode") from None
            except asyncio.TimeoutError:
                raise RequestError(f"the router did not apply the mode within {MODE_ANSWER_S:g} s",
                                   code="unavailable", status=503, type="server_error") from None
        except RequestError as e:
            return error_response(e)
        return JSONResponse({"rank": rank, "mode": mode, "control": "policy" if mode == "auto" else "operator"})

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def health(self, request: Request) -> Response:
        ok, why = self.backend.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "detail": why,
                             "api_key_required": self.settings.api_key is not None},
                            status_code=200 if ok else 503)

    async def metrics_route(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except RequestError as e:
            return error_response(e)
        text = self.metrics.render(self.backend.stats(), self.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def create_app(backend: Backend, tokenizer: Tokenizer, settings: ServerSettings) -> Starlette:
    """The Starlette app; `backend.start(loop)` runs at start-up, `shutdown` at exit."""
    state = App(backend, tokenizer, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backend.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            backend.shutdown()

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal server error"
        return error_response(RequestError(f"{request.method} {request.url.path}: {detail}",
                                           code="not_found" if status == 404 else None, status=status))

    middleware = []
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
            Route("/v1/completions", state.completions, methods=["POST"]),
            Route("/v1/models", state.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", state.model, methods=["GET"]),
            Route("/v1/cluster", state.cluster, methods=["GET"]),
            Route("/v1/cluster/mode", state.set_mode, methods=["POST"]),
            Route("/health", state.health, methods=["GET"]),
            Route("/metrics", state.metrics_route, methods=["GET"]),
            Route("/", state.page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: http_error},
        lifespan=lifespan,
    )
    app.state.pd = state
    return app
