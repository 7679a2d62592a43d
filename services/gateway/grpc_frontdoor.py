"""``megascale.v1.Gateway``: the gRPC twin of the REST API (status codes in gateway.proto).

Same validation, pipeline and stop-string semantics as REST; ``Generate`` takes raw text (no
chat template) or token ids. With an API key configured, calls must carry
``authorization: Bearer KEY`` metadata (UNAUTHENTICATED otherwise).
"""

from __future__ import annotations

import hmac
import time
import uuid

import grpc

from megascale.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.tracing import TRACE_HEADERS
from services.gateway.errors import GatewayError, bad_request
from services.gateway.generation import GenRequest, Pipeline, check_request
from services.gateway.text import ModelText

MAX_TEXT_BYTES = 1 << 20
FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
          "abort": common_pb2.FINISH_REASON_ABORT, "error": common_pb2.FINISH_REASON_ERROR}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, text: ModelText, pipeline: Pipeline, api_key: str | None = None) -> None:
        self.text = text
        self.pipeline = pipeline
        self.api_key = api_key.encode() if api_key else None

    async def Generate(self, request: gateway_pb2.GatewayGenerateRequest,
                       context: grpc.aio.ServicerContext):  # noqa: ANN201 - async generator
        """Stream text deltas; the last event carries finish_reason (and usage if asked)."""
        try:
            self._auth(context)
            gen = self._to_gen(request, context)
            gen.trace_headers = [(k, v) for k, v in context.invocation_metadata() or ()
                                 if k in TRACE_HEADERS]
        except GatewayError as exc:
            self._count(exc.grpc_code.name)  # refused before the pipeline: counted here
            await context.abort(exc.grpc_code, exc.message)
        status = "ok"
        try:
            async for d in self.pipeline.run(gen):
                ev = gateway_pb2.GatewayGenerateEvent(text=d.text, token_ids=d.token_ids,
                                                      request_id=gen.request_id)
                if d.finish_reason is not None:
                    ev.finish_reason = FINISH[d.finish_reason]
                    if request.include_usage:
                        ev.usage.prompt_tokens = d.prompt_tokens
                        ev.usage.completion_tokens = d.completion_tokens
                yield ev
        except GatewayError as exc:
            status = exc.grpc_code.name
            await context.abort(exc.grpc_code, exc.message)
        finally:
            self._count(status)

    def _count(self, status: str) -> None:
        self.pipeline.metrics.requests.labels(endpoint="grpc.Generate", status=status).inc()

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

    def _to_gen(self, r: gateway_pb2.GatewayGenerateRequest,
                context: grpc.aio.ServicerContext) -> GenRequest:
        if r.model != self.text.card.id:
            raise GatewayError(404, f"the model {r.model!r} does not exist; this server serves "
                               f"{self.text.card.id!r}")
        if len(r.request_id) > 128:
            raise bad_request("request_id must be 0..128 characters", "request_id")
        which = r.WhichOneof("prompt")
        if which is None:
            raise bad_request("prompt: give text or token_ids", "prompt")
        if which == "text":
            if not r.text:
                raise bad_request("text must not be empty", "text")
            if len(r.text.encode()) > MAX_TEXT_BYTES:
                raise bad_request("text is longer than 1 MiB", "text")
            ids, param = self.text.encode_text(r.text), "text"
        else:
            ids, param = list(r.token_ids.ids), "token_ids"
        sp = common_pb2.SamplingParams()
        sp.CopyFrom(r.sampling)
        if sp.HasField("temperature") and not 0 <= sp.temperature <= 100:
            raise bad_request(f"sampling.temperature must be in [0, 100], got {sp.temperature}",
                              "sampling.temperature")
        if sp.HasField("top_p") and not 0 < sp.top_p <= 1:
            raise bad_request(f"sampling.top_p must be in (0, 1], got {sp.top_p}",
                              "sampling.top_p")
        if sp.max_tokens and sp.min_tokens > sp.max_tokens:
            raise bad_request(f"sampling.min_tokens ({sp.min_tokens}) exceeds sampling."
                              f"max_tokens ({sp.max_tokens})", "sampling.min_tokens")
        if len(sp.stop_token_ids) > 64:
            raise bad_request("sampling.stop_token_ids holds more than 64 ids",
                              "sampling.stop_token_ids")
        stop = tuple(r.stop)
        check_request(self.text, ids, sp, stop, param)
        remaining = context.time_remaining()
        return GenRequest(ids, sp, stop, request_id=r.request_id or uuid.uuid4().hex,
                          deadline=time.monotonic() + remaining if remaining else None)
