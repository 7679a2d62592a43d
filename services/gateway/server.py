"""The gateway process: the OpenAI REST app (uvicorn, services/gateway/app.py) and
``megascale.v1.Gateway``, the gRPC twin of the REST API, in one event loop.

The gRPC service has the same validation, generation path and stop-string semantics as REST
(status codes in gateway.proto); ``Generate`` takes raw text (no chat template) or token ids.
With an API key configured, calls must carry ``authorization: Bearer KEY`` metadata
(UNAUTHENTICATED otherwise). The ready file adds ``"http": "http://HOST:PORT"`` and
``"model": SERVED_NAME`` to what every role writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid

import grpc

from megascale.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.lifecycle import RoleLifecycle
from services.common.tracing import TRACE_HEADERS
from services.core.request import (
    CLIENT_REQUEST_ID_MAX_LEN,
    InvalidField,
    SamplingParams,
    check_request_id,
    model_id,
    sampling_from_proto,
)
from services.core.structured import compile_grammar
from services.gateway.app import create_app
from services.gateway.backend import (
    Backend,
    GenRequest,
    ReplicaGroup,
    SchedulerPicker,
    StaticPicker,
)
from services.gateway.config import GatewayConfig
from services.gateway.errors import GatewayError, bad_request, invalid_field
from services.gateway.generation import (
    Delta,
    Generation,
    best_of_order,
    check_choices,
    check_request,
    collect_all,
    merge_streams,
    sibling_sampling,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.text import ModelText

log = logging.getLogger("megascale.gateway")

MAX_TEXT_BYTES = 1 << 20


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, text: ModelText, generation: Generation, api_key: str | None = None
                 ) -> None:
        self.text = text
        self.generation = generation
        self.api_key = api_key.encode() if api_key else None

    async def Generate(self, request: gateway_pb2.GatewayGenerateRequest,
                       context: grpc.aio.ServicerContext):  # noqa: ANN201 - async generator
        """Stream text deltas, each tagged with its choice's index; a choice's last event
        carries its finish_reason (and usage if asked)."""
        try:
            self._auth(context)
            # tokenizing can take a while: not on the event loop
            gens, keep = await asyncio.to_thread(self._to_gens, request,
                                                 context.time_remaining())
            trace = [(k, v) for k, v in context.invocation_metadata() or ()
                     if k in TRACE_HEADERS]
            for gen in gens:
                gen.trace_headers = list(trace)
        except GatewayError as exc:
            self._count(exc.grpc_code.name)  # refused before generation.run: counted here
            await context.abort(exc.grpc_code, exc.message)
        status = "ok"
        want_lps = request.sampling.HasField("logprobs")
        try:
            if keep < len(gens):  # best_of: the kept ones whole, once all have finished
                done = await collect_all([self.generation.run(g) for g in gens])
                for index, i in enumerate(best_of_order([c.cumulative_logprob for c in done],
                                                        keep)):
                    c = done[i]
                    whole = Delta(c.text, c.ids, c.last.finish_reason, c.last.prompt_tokens,
                                  c.last.completion_tokens, c.last.error, c.lps, c.plps)
                    yield self._event(whole, gens[i].request_id, index, request, want_lps)
            elif len(gens) == 1:
                async for d in self.generation.run(gens[0]):
                    yield self._event(d, gens[0].request_id, 0, request, want_lps)
            else:
                async for i, d in merge_streams([self.generation.run(g) for g in gens]):
                    if isinstance(d, GatewayError):
                        raise d
                    yield self._event(d, gens[i].request_id, i, request, want_lps)
        except GatewayError as exc:
            status = exc.grpc_code.name
            await context.abort(exc.grpc_code, exc.message)
        finally:
            self._count(status)

    @staticmethod
    def _event(d: Delta, request_id: str, index: int,
               request: gateway_pb2.GatewayGenerateRequest, want_lps: bool
               ) -> gateway_pb2.GatewayGenerateEvent:
        ev = gateway_pb2.GatewayGenerateEvent(text=d.text, token_ids=d.token_ids,
                                              request_id=request_id, index=index)
        for lp in (d.logprobs or ()) if want_lps else ():
            ev.logprobs.add(logprob=lp.logprob, top_token_ids=lp.top_ids,
                            top_logprobs=lp.top_logprobs, rank=lp.rank)
        for lp in d.prompt_logprobs or ():
            ev.prompt_logprobs.add(logprob=lp.logprob, top_token_ids=lp.top_ids,
                                   top_logprobs=lp.top_logprobs, rank=lp.rank)
        if d.finish_reason is not None:
            ev.finish_reason = d.finish_reason.proto
            if request.include_usage:
                ev.usage.prompt_tokens = d.prompt_tokens
                ev.usage.completion_tokens = d.completion_tokens
        return ev

    def _count(self, status: str) -> None:
        self.generation.metrics.requests.labels(endpoint="grpc.Generate", status=status).inc()

    async def ListModels(self, request: gateway_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> gateway_pb2.ListModelsResponse:
        """The one model this gateway serves."""
        try:
            self._auth(context)
        except GatewayError as exc:
            await context.abort(exc.grpc_code, exc.message)
        c = self.text.card
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelCard(
            id=c.id, family=c.family, max_model_len=c.max_model_len,
            created_unix_s=c.created_unix_s)])

    def _auth(self, context: grpc.aio.ServicerContext) -> None:
        if self.api_key is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                      self.api_key):
                    return
        raise GatewayError(401, "missing or invalid API key: send 'authorization: Bearer KEY'")

    def _to_gens(self, r: gateway_pb2.GatewayGenerateRequest, remaining: float | None
                 ) -> tuple[list[GenRequest], int]:
        """The request's sequences (one per choice, best_of of them) and how many to keep."""
        if r.model != self.text.card.id:
            raise GatewayError(404, f"the model {r.model!r} does not exist; this server serves "
                               f"{self.text.card.id!r}")
        keep, count = check_choices(r.n or None, r.best_of or None)
        suffix = len(f"-{count - 1}") if count > 1 else 0  # choice j's id is "ID-j"
        try:
            rid = (check_request_id(r.request_id, CLIENT_REQUEST_ID_MAX_LEN - suffix)
                   if r.request_id else uuid.uuid4().hex)
            sp = sampling_from_proto(r.sampling)
        except InvalidField as exc:
            raise invalid_field(exc, "sampling." if exc.field != "request_id" else "") from None
        if count > keep and sp.logprobs is None:
            sp = dataclasses.replace(sp, logprobs=0)  # best_of ranks by them
        which = r.WhichOneof("prompt")
        if which is None:
            raise bad_request("prompt: give text or token_ids", "prompt")
        if which == "text":
            if not r.text:
                raise bad_request("text must not be empty", "text")
            if len(r.text.encode()) > MAX_TEXT_BYTES:
                raise bad_request("text is longer than 1 MiB", "text")
            ids, param = self.text.encode_text(r.text, "text"), "text"
        else:
            ids, param = list(r.token_ids.ids), "token_ids"
        stop = tuple(r.stop)
        sp = self._structured(r, sp)
        check_request(self.text, ids, sp, stop, param)
        for word in sp.bad_words_ids:
            self.text.check_ids(list(word), "sampling.bad_words")
        if sp.grammar is not None:
            try:
                self.text.grammars().check(sp.grammar)
            except InvalidField as exc:
                raise invalid_field(exc, "sampling.") from None
        deadline = time.monotonic() + remaining if remaining else None
        group = ReplicaGroup() if count > 1 else None  # one replica: the prompt KV shared
        return [GenRequest(ids, sibling_sampling(sp, j, count), stop,
                           request_id=rid if count == 1 else f"{rid}-{j}", deadline=deadline,
                           include_stop_str=r.include_stop_str_in_output, group=group)
                for j in range(count)], keep

    def _structured(self, r: gateway_pb2.GatewayGenerateRequest, sp: SamplingParams
                    ) -> SamplingParams:
        """``sp`` with the request's bad words and structured output (compiled) added."""
        changes: dict = {}
        if r.bad_words:
            changes["bad_words_ids"] = (*sp.bad_words_ids,
                                        *self.text.bad_words_ids(list(r.bad_words)))
        kind = r.structured.WhichOneof("kind") if r.HasField("structured") else None
        if kind is not None:
            if sp.grammar is not None:
                raise bad_request("give one of structured and sampling.grammar", "structured")
            spec = getattr(r.structured, kind)
            if kind == "choice":
                spec = list(spec.choices)
            elif kind == "json_object" and not spec:
                raise bad_request("structured.json_object must be true", "structured")
            try:
                grammar = compile_grammar(kind, spec, "structured")
                self.text.grammars().check(grammar, "structured")
            except InvalidField as exc:
                raise invalid_field(exc) from None
            changes["grammar"] = grammar
        if not changes:
            return sp
        try:
            return dataclasses.replace(sp, **changes)
        except InvalidField as exc:
            raise invalid_field(exc, "sampling.") from None


async def serve(config: GatewayConfig, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve REST + gRPC until ``stop`` is set (or forever)."""
    import uvicorn

    async with RoleLifecycle("gateway", config.node_id, config.host) as life:
        text = ModelText(config.model_dir, config.served_model_name, config.max_model_len)
        metrics = GatewayMetrics(config.served_model_name)
        picker = (SchedulerPicker(config.scheduler, model_id(config.model_dir),
                                  known=config.attention)
                  if config.scheduler else StaticPicker(config.attention))
        backend = Backend(picker, metrics, config.request_timeout_s, config.max_attempts)
        life.defer(backend.close)
        generation = Generation(text, backend, metrics)
        app = create_app(text, generation, metrics, config.api_key, config.max_body_bytes,
                         config.tool_call_parser, config.allowed_origins)
        servicer = GatewayServicer(text, generation, config.api_key)
        await life.start_grpc(
            config.grpc_port,
            lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
            [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name], internal=False)
        life.serve_metrics(metrics.registry, config.metrics_port)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.http_port,
                                               log_level="warning", access_log=False,
                                               lifespan="off", timeout_graceful_shutdown=2))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign] # CLI owns
        http_task = asyncio.create_task(server.serve())

        async def stop_http() -> None:
            server.should_exit = True
            await asyncio.gather(http_task, return_exceptions=True)

        life.defer(stop_http)
        while not server.started:
            if http_task.done():  # failed to bind: surface the error
                await http_task
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.02)
        http_port = server.servers[0].sockets[0].getsockname()[1]
        await life.ready(ready_file, {"model": config.served_model_name,
                                      "http": f"http://{config.host}:{http_port}"})
        log.info("gateway %s serving %s: http://%s:%d, gRPC %s, replicas %s", config.node_id,
                 config.served_model_name, config.host, http_port, life.grpc_address,
                 config.scheduler and f"via scheduler {config.scheduler}" or ",".join(
                     config.attention))
        await life.wait(stop, http_task)
