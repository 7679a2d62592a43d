"""The request-facing half of the ``Attention`` service: proto <-> engine conversion, the relay
that hands engine events to the server's event loop, per-request metrics and spans, and the
multiplexed ``GenerateStream`` call.

Two ways in, one engine path:

- ``Generate``: one call per request, one gRPC message per event. Simple for direct clients;
  each message costs ~40 us of the replica's event loop, which shares the replica's core with
  the engine (``bench/pingpong.py`` measures it: docs/BENCHMARKS.md §3).
- ``GenerateStream`` (:class:`StreamCall`): many requests per call, and every burst of events
  the engine delivers goes out as ONE ``GenerateStreamEvents`` message. The gateway uses it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc
from opentelemetry.trace import Span, SpanKind

from megascale.v1 import attention_pb2, common_pb2
from services.attention.batching import QueueFull
from services.attention.engine import Engine, Listener, TokenEvent
from services.attention.metrics import AttentionMetrics
from services.common import tracing
from services.core.request import FinishReason, sampling_from_proto
from services.errors import UserError


def admit(engine: Engine, req: attention_pb2.GenerateRequest, listener: Listener,
          meter: RequestMeter) -> None:
    """Hand one GenerateRequest to the engine (the same for ``Generate`` and
    ``GenerateStream``); raises UserError or QueueFull as :meth:`Engine.submit` does."""
    engine.submit(req.request_id, list(req.prompt_token_ids), sampling_from_proto(req.sampling),
                  listener, list(req.output_token_ids),
                  tracing.span_ids(meter.span) if meter.span else None)


def abort_reason(req: attention_pb2.AbortRequest) -> FinishReason:
    """What an abort counts as: STOP when the client says it matched a stop string."""
    return (FinishReason.STOP if FinishReason.from_proto(req.reason) is FinishReason.STOP
            else FinishReason.ABORT)


def event_to_proto(ev: TokenEvent) -> attention_pb2.GenerateEvent:
    out = attention_pb2.GenerateEvent(
        token_ids=ev.token_ids, index=ev.index,
        usage=common_pb2.Usage(prompt_tokens=ev.prompt_tokens,
                               completion_tokens=ev.completion_tokens))
    if ev.finish_reason is not None:
        out.finish_reason = ev.finish_reason.proto
    if ev.error:
        out.error_message = ev.error
    if ev.stop_token_id is not None:
        out.stop_token_id = ev.stop_token_id
    for lp in ev.logprobs or ():  # a resumed token's (None) never reaches an event
        entry = out.logprobs.add()
        if lp is not None:
            entry.logprob = lp.logprob
            entry.top_token_ids.extend(lp.top_ids)
            entry.top_logprobs.extend(lp.top_logprobs)
            entry.rank = lp.rank
    for lp in ev.prompt_logprobs or ():
        out.prompt_logprobs.add(logprob=lp.logprob, top_token_ids=lp.top_ids,
                                top_logprobs=lp.top_logprobs, rank=lp.rank)
    return out


def arrival_from_unix_ns(value: int | str | None) -> float:
    """The gateway's arrival time (Unix ns) as a time.monotonic() timestamp; now when absent
    or malformed, and at most an hour back."""
    try:
        ns = int(value) if value else 0
    except ValueError:
        ns = 0
    if ns <= 0:
        return time.monotonic()
    age = time.time() - ns / 1e9
    return time.monotonic() - max(0.0, min(age, 3600.0))


class EventRelay:
    """Hands engine-thread events to the server's event loop, one wake-up per burst.

    A decode step finishes every running request at once; waking the loop once per event
    would make it contend for the GIL with the engine thread B times per step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, TokenEvent]] = []

    def push(self, queue: asyncio.Queue, event: TokenEvent) -> None:
        with self._lock:
            self._pending.append((queue, event))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, event in items:
            queue.put_nowait(event)


class RequestMeter:
    """One request's latency metrics and span, observed as its events reach the stream."""

    def __init__(self, metrics: AttentionMetrics, arrival: float, span: Span | None) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.span = span
        self.last: float | None = None

    def observe(self, ev: TokenEvent) -> None:
        m, now = self.metrics, time.monotonic()
        m.delivery.observe(now - ev.emitted)
        if ev.token_ids:
            if self.last is None:
                m.ttft.observe(now - self.arrival)
            else:
                m.itl.observe((now - self.last) / len(ev.token_ids))
            self.last = now
            m.generated.inc(len(ev.token_ids))
        if ev.finish_reason is not None:
            m.e2e.observe(now - self.arrival)

    def end(self, reason: str) -> None:
        if self.span is not None:
            self.span.set_attribute("megascale.finish_reason", reason)
            self.span.end()
            self.span = None


def start_span(request_id: str, prompt_tokens: int, headers: Iterable[tuple[str, str]]
               ) -> Span | None:
    """The replica's span of one request, child of the gateway's (W3C ``headers``); None when
    tracing is off."""
    if not tracing.enabled():
        return None
    return tracing.tracer(__name__).start_span(
        "attention.generate", tracing.context_from_headers(headers), kind=SpanKind.SERVER,
        attributes={"megascale.request_id": request_id,
                    "megascale.prompt_tokens": prompt_tokens})


@dataclass(frozen=True)
class Rejection:
    """A GenerateStream submission the replica refused (what Generate would abort with)."""

    request_id: str
    code: grpc.StatusCode
    message: str


_READER_DONE = object()  # queued by the reader when the client half-closes


class StreamCall:
    """One ``GenerateStream`` call: submits what the client sends, batches what the engine
    delivers. Use :meth:`run` as the handler's async generator."""

    def __init__(self, engine: Engine, metrics: AttentionMetrics, relay: EventRelay) -> None:
        self.engine = engine
        self.metrics = metrics
        self.relay = relay
        self.queue: asyncio.Queue = asyncio.Queue()
        self.live: dict[str, RequestMeter] = {}
        self.read_error: Exception | None = None

    def submit(self, msg: attention_pb2.StreamSubmit) -> None:
        """Hand one submission to the engine; a refusal is queued as a :class:`Rejection`."""
        req = msg.request
        rid = req.request_id
        headers = [(k, v) for k, v in (("traceparent", msg.traceparent),
                                       ("tracestate", msg.tracestate)) if v]
        meter = RequestMeter(self.metrics, arrival_from_unix_ns(msg.arrival_unix_ns),
                             start_span(rid, len(req.prompt_token_ids), headers))
        try:
            # the engine refuses an id live anywhere on the replica, this call's included
            admit(self.engine, req, lambda ev: self.relay.push(self.queue, ev), meter)
            # events reach the queue through the event loop, so never before this line
            self.live[rid] = meter
        except (UserError, QueueFull) as exc:
            code = (grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, UserError)
                    else grpc.StatusCode.RESOURCE_EXHAUSTED)
            meter.end(code.name.lower())
            self.queue.put_nowait(Rejection(rid, code, str(exc)))

    async def _read(self, requests: AsyncIterator[attention_pb2.GenerateStreamRequest]) -> None:
        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if kind == "submit":
                    self.submit(msg.submit)
                elif kind == "abort" and msg.abort.request_id in self.live:
                    self.engine.abort(msg.abort.request_id, abort_reason(msg.abort))
        except Exception as exc:  # noqa: BLE001 - the call fails with it (run raises it)
            self.read_error = exc
        finally:
            self.queue.put_nowait(_READER_DONE)

    async def run(self, requests: AsyncIterator[attention_pb2.GenerateStreamRequest]
                  ) -> AsyncIterator[attention_pb2.GenerateStreamEvents]:
        """Yield one message per burst until the client has half-closed and every request of
        the call has finished; however it ends, unfinished requests are aborted."""
        reader = asyncio.create_task(self._read(requests))
        reading = True
        try:
            while reading or self.live:
                items = [await self.queue.get()]
                while not self.queue.empty():  # the whole burst: one message
                    items.append(self.queue.get_nowait())
                out = attention_pb2.GenerateStreamEvents()
                for item in items:
                    if item is _READER_DONE:
                        reading = False
                        if self.read_error is not None:
                            raise self.read_error
                    elif isinstance(item, Rejection):
                        out.events.add(request_id=item.request_id,
                                       rejected_code=item.code.value[0],
                                       rejected_message=item.message)
                    else:
                        self._relay_event(item, out)
                if out.events:
                    yield out
        finally:
            reader.cancel()
            for rid, meter in self.live.items():
                self.engine.abort(rid)
                meter.end("cancelled")
            self.live.clear()

    def _relay_event(self, ev: TokenEvent, out: attention_pb2.GenerateStreamEvents) -> None:
        meter = self.live.get(ev.request_id)
        if meter is None:  # a request of this call that already ended (cannot happen twice)
            return
        meter.observe(ev)
        out.events.add(request_id=ev.request_id, event=event_to_proto(ev))
        if ev.finish_reason is not None:
            del self.live[ev.request_id]
            meter.end(ev.finish_reason)
