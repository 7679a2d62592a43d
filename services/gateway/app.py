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
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.tracing import TRACE_HEADERS
from services.core.logits_processors import TokenLogprobs
from services.core.request import FinishReason
from services.gateway.errors import GatewayError, bad_request
from services.gateway.generation import (
    Collected,
    Delta,
    Generation,
    best_of_order,
    collect_all,
    merge_streams,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import (
    ApiPlan,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chunk,
    detokenize,
    logprobs_json,
    parse,
    prompt_logprobs_json,
    to_plan,
    tokenize,
    usage,
    usage_chunk,
)
from services.gateway.text import ModelText
from services.gateway.tools import ToolStream, calls_of

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
               api_key: str | None = None, max_body_bytes: int = 4 << 20,
               tool_call_parser: str = "hermes", allowed_origins: tuple[str, ...] = ()
               ) -> ASGIApp:
    """The ASGI app: FastAPI routes wrapped in :class:`GatewayASGI`, and in CORS (outermost,
    so that browsers' preflight requests are answered before the API key is asked for) when
    ``allowed_origins`` names any."""
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
        # tokenizing (and the chat template, grammars) can take a while: not on the event loop
        plan = await asyncio.to_thread(to_plan, req, text, rid, tool_call_parser)
        trace = [(k, request.headers[k]) for k in TRACE_HEADERS if k in request.headers]
        for gen in plan.gens:
            gen.trace_headers = list(trace)
        want_ids = bool(req.return_token_ids)
        if req.stream:
            opts = req.stream_options
            streams = [generation.run(gen) for gen in plan.gens]
            try:  # replica errors before streaming -> HTTP status
                firsts = list(await asyncio.gather(*(anext(st) for st in streams)))
            except BaseException:
                for st in streams:
                    await st.aclose()
                raise
            return SSEResponse(_sse(rid, chat, plan, streams, firsts, want_ids,
                                    bool(opts and opts.include_usage),
                                    bool(opts and opts.continuous_usage_stats)),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
        task = asyncio.ensure_future(collect_all([generation.run(gen) for gen in plan.gens]))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
        results = task.result()
        for r in results:
            if r.last.finish_reason is FinishReason.ERROR:
                raise GatewayError(503, f"generation failed: {r.last.error or 'replica error'}")
        return JSONResponse(_response(rid, chat, plan, results, want_ids))

    def _response(rid: str, chat: bool, plan: ApiPlan, results: list[Collected], want_ids: bool
                  ) -> dict[str, Any]:
        order: list[int] = []
        for pi in range(len(plan.prompts)):
            seqs = [i for i, p in enumerate(plan.prompt_of) if p == pi]
            if plan.best_of > plan.keep:  # the highest cumulative logprob first
                seqs = [seqs[k] for k in best_of_order(
                    [results[i].cumulative_logprob for i in seqs], plan.keep)]
            order += seqs[: plan.keep]
        choices = []
        for index, i in enumerate(order):
            r, pi = results[i], plan.prompt_of[i]
            choice: dict[str, Any] = {"index": index, "logprobs": None,
                                      "finish_reason": r.last.finish_reason}
            if plan.logprobs is not None:
                ids, lps = r.ids, _top(r.lps, plan.logprobs)
                if plan.echo:  # the prompt's tokens first (its first one has no logprob)
                    ids = plan.prompts[pi] + ids
                    lps = [None, *_top(r.plps or [], plan.logprobs), *lps]
                choice["logprobs"] = logprobs_json(text, ids, lps, chat)
            if plan.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(
                    text, plan.prompts[pi], r.plps or [], plan.prompt_logprobs)
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": r.text}
                if plan.tools is not None:
                    content, calls = calls_of(plan.tools, r.text)
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = [c.to_openai() for c in calls]
                        if plan.tools.mode != "named":
                            choice["finish_reason"] = "tool_calls"
                choice["message"] = message
            else:
                choice["text"] = (plan.echo[pi] if plan.echo else "") + r.text
            if want_ids:
                choice["token_ids"] = r.ids
                if len(plan.prompts) > 1:
                    choice["prompt_token_ids"] = plan.prompts[pi]
            choices.append(choice)
        out: dict[str, Any] = {
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": card.id, "choices": choices,
            "usage": usage(plan.prompt_tokens, sum(r.last.completion_tokens for r in results))}
        if want_ids and len(plan.prompts) == 1:
            out["prompt_token_ids"] = plan.prompts[0]
        return out

    async def _sse(rid: str, chat: bool, plan: ApiPlan, streams: list[AsyncIterator[Delta]],
                   firsts: list[Delta], want_ids: bool, include_usage: bool, continuous: bool
                   ) -> AsyncIterator[str]:
        created = int(time.time())
        n = len(streams)
        completion = [0] * n
        offsets = [0] * n
        started = [False] * n
        tool_streams = [ToolStream(plan.tools) if plan.tools is not None else None
                        for _ in range(n)]
        merged = merge_streams(streams, firsts)
        try:
            if chat:  # the OpenAI stream opens with the assistant role
                for i in range(n):
                    yield _data(chunk(rid, card.id, created, True, i, text="", role=True,
                                      include_usage=include_usage))
            async for i, d in merged:
                if isinstance(d, GatewayError):
                    yield _data(d.body())
                    break
                if d.finish_reason is FinishReason.ERROR:
                    yield _data(GatewayError(503, f"generation failed: {d.error}").body())
                    break
                completion[i] = d.completion_tokens
                piece = d.text
                if plan.echo and not started[i]:
                    piece = plan.echo[plan.prompt_of[i]] + piece
                started[i] = True
                lp = None
                if plan.logprobs is not None and d.logprobs is not None:
                    ids, lps = d.token_ids, _top(d.logprobs, plan.logprobs)
                    if plan.echo and d.prompt_logprobs is not None:
                        ids = plan.prompts[plan.prompt_of[i]] + ids
                        lps = [None, *_top(d.prompt_logprobs, plan.logprobs), *lps]
                    elif plan.echo and offsets[i] == 0:
                        offsets[i] = len(plan.echo[plan.prompt_of[i]])
                    lp = logprobs_json(text, ids, lps, chat, offsets[i])
                    offsets[i] += sum(len(t) for t in lp.get("tokens", ()))
                finish: str | None = d.finish_reason
                calls = None
                ts = tool_streams[i]
                if ts is not None:
                    piece, calls = ts.push(piece, d.finish_reason is not None)
                    if (finish is FinishReason.STOP and ts.count
                            and plan.tools.mode != "named"):
                        finish = "tool_calls"
                out = chunk(rid, card.id, created, chat, i, text=piece, finish_reason=finish,
                            token_ids=d.token_ids if want_ids else None,
                            include_usage=include_usage, logprobs=lp, tool_calls=calls,
                            usage_now=(usage(len(plan.gens[i].prompt_ids), completion[i])
                                       if continuous else None))
                if plan.prompt_logprobs is not None and d.prompt_logprobs is not None:
                    out["choices"][0]["prompt_logprobs"] = prompt_logprobs_json(
                        text, plan.gens[i].prompt_ids, d.prompt_logprobs, plan.prompt_logprobs)
                yield _data(out)
            else:
                if include_usage:
                    yield _data(usage_chunk(rid, card.id, created, chat, plan.prompt_tokens,
                                            sum(completion)))
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    outer: ASGIApp = GatewayASGI(app, metrics, api_key)
    if allowed_origins:
        outer = CORSMiddleware(outer, allow_origins=list(allowed_origins), allow_methods=["*"],
                               allow_headers=["*"])
    return outer


def _top(lps: list[TokenLogprobs], k: int) -> list[TokenLogprobs]:
    """``lps`` with at most ``k`` alternatives each (the replica may send more)."""
    return [TokenLogprobs(lp.logprob, lp.top_ids[:k], lp.top_logprobs[:k], lp.rank)
            for lp in lps]


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
