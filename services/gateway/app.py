"""The OpenAI-compatible REST app (FastAPI), docs/ARCHITECTURE.md §3 steps 1 and 9.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``: SSE
``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``), ``GET /v1/models`` and
``/v1/models/{id}``, ``POST /tokenize`` and ``/detokenize`` (vLLM's), ``GET /version``,
``GET /health``, ``GET /metrics`` (Prometheus text).

Errors are always ``{"error": {"message", "type", "param", "code"}}``: bad input 400 (never
422), bad API key 401, unknown model or route 404, body over ``max_body_bytes`` 413, replicas
full 429, none reachable 503. A stream that fails after it started sends one
``data: {"error": {...}}`` event, then ``data: [DONE]``.

A client that goes away cancels its request downstream: the SSE response watches for the
disconnect and the non-streaming handler polls for it.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.tracing import TRACE_HEADERS
from services.core.request import FinishReason
from services.gateway.errors import GatewayError, bad_request
from services.gateway.generation import Delta, Generation
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chunk,
    completion_response,
    detokenize,
    parse,
    to_gen_request,
    tokenize,
    usage_chunk,
)
from services.gateway.text import ModelText

log = logging.getLogger("megascale.gateway")

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/version"})
ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                       "/ready", "/version", "/tokenize", "/detokenize",
                       "/metrics"})
DISCONNECT_POLL_S = 0.25
try:
    VERSION = importlib.metadata.version("megascale-infer")
except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
    VERSION = "unknown"


def error_response(err: GatewayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class GatewayASGI:
    """Outermost layer: API-key check and the requests counter (by endpoint and status).

    A pure ASGI middleware (not BaseHTTPMiddleware) so streaming and cancellation pass through
    untouched.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                resp = error_response(GatewayError(
                    401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key"))
                await resp(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            if endpoint != "/metrics":
                self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                           self.api_key)
        return False


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client's disconnect and then cancels
    the stream (whatever ASGI spec version the server speaks), so the downstream call is
    cancelled at once instead of at the next write."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch):
                task.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            exc = stream.exception()
            if not isinstance(exc, OSError):  # a write to a gone client
                raise exc


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 over ``limit`` bytes (checked while reading), 400 if not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise GatewayError(413, f"request body of {length} bytes exceeds the limit of {limit}")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise GatewayError(413, f"request body exceeds the limit of {limit} bytes")
        parts.append(part)
    try:
        body = json.loads(b"".join(parts))
    except RecursionError:
        raise bad_request("the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # a decode error, or an integer past Python's digit limit
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    _check_text(body)
    return body


def _check_text(body: Any) -> None:
    """400 naming the top-level field when any string holds a lone surrogate: ``"\\ud800"``
    is a valid JSON escape but no text, and the tokenizer or the response would fail on it."""
    stack = [(k, v) for k, v in body.items()] if isinstance(body, dict) else [(None, body)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # the field name is the client's too: shown escaped unless plain printable ASCII
                name = "body" if field is None else field if (
                    field.isascii() and field.isprintable()) else json.dumps(field)
                raise bad_request(f"{name}: a string holds a lone surrogate (not valid "
                                  "Unicode text)", name) from None
        elif isinstance(value, dict):
            stack.extend((field, v) for k, v in value.items())
            stack.extend((field, k) for k in value)
        elif isinstance(value, list):
            stack.extend((field, v) for v in value)


def create_app(text: ModelText, generation: Generation, metrics: GatewayMetrics,
               api_key: str | None = None, max_body_bytes: int = 4 << 20) -> ASGIApp:
    """The ASGI app: FastAPI routes wrapped in :class:`GatewayASGI`."""
    app = FastAPI(title="megascale-infer gateway", docs_url=None, redoc_url=None,
                  openapi_url=None)
    card = text.card

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(bad_request(f"{loc}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(GatewayError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(GatewayError(500, f"internal error: {type(exc).__name__}"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: this process serves HTTP (whatever the state of the mesh)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        """Readiness: a request sent now could be served (a replica answers and can reach
        every expert); 503 with the reason otherwise."""
        why = await generation.backend.unready()
        if why is not None:
            raise GatewayError(503, f"not ready: {why}")
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    model_card = {"id": card.id, "object": "model", "created": int(card.created_unix_s),
                  "owned_by": "megascale", "root": card.id, "max_model_len": card.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != card.id:
            raise GatewayError(404, f"the model {model_id!r} does not exist; this server "
                               f"serves {card.id!r}", param="model", code="model_not_found")
        return model_card

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict[str, Any]:
        req = parse(TokenizeRequest, await read_json(request, max_body_bytes))
        return await asyncio.to_thread(tokenize, req, text)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        req = parse(DetokenizeRequest, await read_json(request, max_body_bytes))
        return await asyncio.to_thread(detokenize, req, text)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, ChatRequest, chat=True)

    async def _generate(request: Request, model: type, chat: bool) -> Response:
        body = await read_json(request, max_body_bytes)
        req = parse(model, body)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        # tokenizing (and the chat template) can take a while: not on the event loop
        gen = await asyncio.to_thread(to_gen_request, req, text, rid)
        gen.trace_headers = [(k, request.headers[k]) for k in TRACE_HEADERS
                             if k in request.headers]
        want_ids = bool(req.return_token_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            deltas = generation.run(gen)
            try:
                first = await anext(deltas)  # replica errors before streaming -> HTTP status
            except BaseException:
                await deltas.aclose()
                raise
            return SSEResponse(_sse(rid, chat, first, deltas, want_ids, include_usage,
                                    gen.prompt_ids), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
        task = asyncio.ensure_future(_collect(generation.run(gen)))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
        text_out, ids, last = task.result()
        if last.finish_reason is FinishReason.ERROR:
            raise GatewayError(503, f"generation failed: {last.error or 'replica error'}")
        return JSONResponse(completion_response(
            rid, card.id, text_out, last, ids, gen.prompt_ids if want_ids else None, chat))

    async def _sse(rid: str, chat: bool, first: Delta, deltas: AsyncIterator[Delta],
                   want_ids: bool, include_usage: bool, prompt_ids: list[int]
                   ) -> AsyncIterator[str]:
        created = int(time.time())
        last = first
        try:
            if chat:  # the OpenAI stream opens with the assistant role
                yield _data(chunk(rid, card.id, created, True, "", None, role=True,
                                  include_usage=include_usage))
            d: Delta | None = first
            while d is not None:
                last = d
                if d.finish_reason is FinishReason.ERROR:
                    yield _data(GatewayError(503, f"generation failed: {d.error}").body())
                    break
                yield _data(chunk(rid, card.id, created, chat, d.text, d.finish_reason,
                                  d.token_ids if want_ids else None,
                                  include_usage=include_usage))
                if d.finish_reason is not None:
                    break
                d = await anext(deltas, None)
            if include_usage:
                yield _data(usage_chunk(rid, card.id, created, chat, last))
        except GatewayError as exc:
            yield _data(exc.body())
        finally:
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    return GatewayASGI(app, metrics, api_key)


async def _collect(deltas: AsyncIterator[Delta]) -> tuple[str, list[int], Delta]:
    parts: list[str] = []
    ids: list[int] = []
    last: Delta | None = None
    try:
        async for d in deltas:
            parts.append(d.text)
            ids.extend(d.token_ids)
            last = d
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    assert last is not None and last.finish_reason is not None
    return "".join(parts), ids, last


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
