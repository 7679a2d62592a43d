"""Pick an attention replica and stream a request's tokens from it (docs/ARCHITECTURE.md §3 step 3).

Replicas come from a static list (``--attention``: the one with the fewest of this gateway's
requests in flight, a replica that just failed is skipped for a cool-down) or from the
scheduler's ``PickReplica`` (``--scheduler``). :meth:`Backend.stream` retries another replica
when one is UNAVAILABLE or full before anything was streamed, and *resumes* on another replica
(``output_token_ids`` = tokens already streamed) when one breaks mid-stream, deduplicating by
the events' ``index``. Requests reach a replica over one shared ``GenerateStream`` call
(services/gateway/replica_stream.py); closing the iterator early, or the deadline passing,
aborts the request there.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from megascale.v1 import attention_pb2, attention_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.common import auth
from services.common.grpcserver import MAX_MESSAGE_BYTES
from services.core.logits_processors import TokenLogprobs
from services.core.prefix_hash import routing_keys
from services.core.request import (
    FinishReason,
    SamplingParams,
    attempt_request_id,
    sampling_to_proto,
)
from services.gateway.errors import GatewayError, rpc_error_to_gateway, status_to_gateway
from services.gateway.metrics import GatewayMetrics
from services.gateway.replica_stream import STATUS_BY_NUMBER, ReplicaFailure, ReplicaStream

log = logging.getLogger("megascale.gateway")

FAILED_COOLDOWN_S = 5.0
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class Replica:
    node_id: str
    address: str


@dataclass(eq=False)
class ReplicaGroup:
    """Sequences that share a prompt (a request's ``n`` / ``best_of`` choices): their first
    attempt goes to the replica the first of them was given, so the prompt's full KV blocks
    are computed once there and shared (prefix caching; services/attention/batching.py). A
    retry or resume picks as usual."""

    replica: Replica | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class GenRequest:
    """One validated generation request, as both front doors build it and the backend sends
    it downstream (``request_id`` at most CLIENT_REQUEST_ID_MAX_LEN, leaving room for the
    attempt suffix; ``stop`` strings are matched here, the replica never sees them)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival_unix_ns: int = field(default_factory=time.time_ns)
    arrival_mono: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() deadline; None = the config's timeout
    trace_headers: list[tuple[str, str]] = field(default_factory=list)  # W3C context
    # Why the gateway ends it before the replica does, if it does: STOP once it matched a
    # stop string (set by Generation.run; the replica counts the abort as that).
    ended_as: FinishReason = FinishReason.ABORT
    include_stop_str: bool = False  # vLLM's include_stop_str_in_output
    group: ReplicaGroup | None = None  # siblings sharing the prompt


@dataclass
class ReplicaEvent:
    """New tokens from the replica (deduplicated across resumes)."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str = ""
    logprobs: list[TokenLogprobs] | None = None  # per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens after the first


def _lps(entries) -> list[TokenLogprobs]:  # noqa: ANN001 - repeated TokenLogprob
    return [TokenLogprobs(e.logprob, tuple(e.top_token_ids), tuple(e.top_logprobs), e.rank)
            for e in entries]


class ReplicaPicker(Protocol):
    async def pick(self, prompt_tokens: int, exclude: Sequence[str],
                   prefix: Sequence[int] = ()) -> Replica: ...
    def known(self) -> list[Replica]: ...
    def started(self, replica: Replica) -> None: ...
    def finished(self, replica: Replica, failed: bool) -> None: ...
    async def close(self) -> None: ...


class StaticPicker:
    """Least in-flight (this gateway's requests) among a fixed list, round robin on ties."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.replicas = [Replica(a, a) for a in addresses]
        self.in_flight = {r.node_id: 0 for r in self.replicas}
        self.failed_at: dict[str, float] = {}
        self._rr = itertools.count()

    def known(self) -> list[Replica]:
        return list(self.replicas)

    def learn(self, replica: Replica) -> None:
        """Add a replica (one the scheduler handed out); a known address is renamed."""
        for i, r in enumerate(self.replicas):
            if r.address == replica.address:
                if r.node_id != replica.node_id:
                    self.replicas[i] = replica
                    self.in_flight[replica.node_id] = self.in_flight.pop(r.node_id, 0)
                return
        self.replicas.append(replica)
        self.in_flight.setdefault(replica.node_id, 0)

    async def pick(self, prompt_tokens: int, exclude: Sequence[str],
                   prefix: Sequence[int] = ()) -> Replica:
        """``prefix`` (the prompt's routing hashes) is not used: no prefix affinity without
        the scheduler."""
        now = time.monotonic()
        ok = [r for r in self.replicas if r.node_id not in exclude]
        healthy = [r for r in ok if now - self.failed_at.get(r.node_id, -1e9) > FAILED_COOLDOWN_S]
        pool = healthy or ok  # all recently failed: try them anyway
        if not pool:
            raise GatewayError(503, "no healthy attention replica is available")
        turn = next(self._rr)
        n = len(pool)
        return min((pool[(turn + i) % n] for i in range(n)),
                   key=lambda r: self.in_flight[r.node_id])

    def started(self, replica: Replica) -> None:
        self.in_flight[replica.node_id] = self.in_flight.get(replica.node_id, 0) + 1

    def finished(self, replica: Replica, failed: bool) -> None:
        self.in_flight[replica.node_id] = self.in_flight.get(replica.node_id, 1) - 1
        if failed:
            self.failed_at[replica.node_id] = time.monotonic()
        else:
            self.failed_at.pop(replica.node_id, None)

    async def close(self) -> None:
        return None


class SchedulerPicker:
    """Ask the scheduler's ``PickReplica`` (least-loaded healthy replica) for every request.

    When the scheduler cannot be reached (it or its Redis is down), requests go on to the
    replicas this gateway knows, the way :class:`StaticPicker` picks: the ``--attention`` list
    and every replica the scheduler has handed out. For ``retry_s`` after such a failure
    requests go straight to those replicas (a frozen scheduler would cost each one the whole
    ``timeout_s``); then the next request asks the scheduler again, so its answers take over
    within ``retry_s`` of it being back.
    """

    def __init__(self, address: str, model: str, known: Sequence[str] = (),
                 timeout_s: float = 2.0, retry_s: float = 1.0) -> None:
        self.address = address
        self.model = model
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._skip_until = 0.0  # time.monotonic() before which the scheduler is not asked
        self.fallback = StaticPicker(known)
        self.fallbacks = 0  # requests placed without the scheduler
        self._channel: grpc.aio.Channel | None = None

    async def pick(self, prompt_tokens: int, exclude: Sequence[str],
                   prefix: Sequence[int] = ()) -> Replica:
        if time.monotonic() < self._skip_until and self.fallback.replicas:
            self.fallbacks += 1
            return await self.fallback.pick(prompt_tokens, exclude, prefix)
        if self._channel is None:
            self._channel = auth.channel(self.address)
        stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        try:
            resp = await stub.PickReplica(scheduler_pb2.PickReplicaRequest(
                prompt_tokens=prompt_tokens, exclude_node_ids=list(exclude), model=self.model,
                prefix_hashes=prefix),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = rpc_error_to_gateway(exc, f"scheduler {self.address}")
            if err.status == 400:  # our request was wrong: not the client's fault
                err = GatewayError(502, f"scheduler {self.address}: {err.message}")
            unreachable = exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED)
            if unreachable and self.fallback.replicas:
                self._skip_until = time.monotonic() + self.retry_s
                if not self.fallbacks:
                    log.warning("scheduler %s unreachable (%s): picking among %d known "
                                "replicas until it answers again", self.address,
                                exc.code().name, len(self.fallback.replicas))
                self.fallbacks += 1
                return await self.fallback.pick(prompt_tokens, exclude, prefix)
            raise err from None
        if self.fallbacks:
            log.info("scheduler %s answers again (%d requests were placed without it)",
                     self.address, self.fallbacks)
            self.fallbacks = 0
        replica = Replica(resp.node_id or resp.address, resp.address)
        self.fallback.learn(replica)
        return replica

    def known(self) -> list[Replica]:
        return self.fallback.known()

    def started(self, replica: Replica) -> None:
        self.fallback.started(replica)

    def finished(self, replica: Replica, failed: bool) -> None:
        self.fallback.finished(replica, failed)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class Backend:
    """Streams requests from attention replicas, with failover and resume."""

    def __init__(self, picker: ReplicaPicker, metrics: GatewayMetrics, timeout_s: float,
                 max_attempts: int = 3) -> None:
        self.picker = picker
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, ReplicaStream] = {}  # one shared GenerateStream per replica

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = auth.channel(address, _CHANNEL_OPTIONS)
        return ch

    def _stream(self, address: str) -> ReplicaStream:
        stream = self._streams.get(address)
        if stream is None:
            stream = self._streams[address] = ReplicaStream(self._channel(address))
        return stream

    async def unready(self, timeout_s: float = 1.0, max_checked: int = 4) -> str | None:
        """None when some replica can serve a request now (it answers GetLoad within
        ``timeout_s`` and every expert has a live replica in its routing table); else why
        not, in one line (the gateway's ``/ready``)."""
        candidates = self.picker.known()[:max_checked]
        if not candidates:
            try:
                candidates = [await self.picker.pick(0, ())]
            except GatewayError as exc:
                return exc.message
        why = []
        for r in candidates:
            stub = attention_pb2_grpc.AttentionStub(self._channel(r.address))
            try:
                load = await stub.GetLoad(attention_pb2.GetLoadRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                why.append(f"replica {r.node_id}: {exc.code().name}")
                continue
            if load.experts_complete:
                return None
            why.append(f"replica {r.node_id}: some expert has no live replica (down: "
                       f"{', '.join(load.expert_nodes_down) or 'none reported'})")
        return "; ".join(why)

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        await self.picker.close()

    async def stream(self, req: GenRequest) -> AsyncIterator[ReplicaEvent]:
        """Yield the request's tokens until an event with ``finish_reason``.

        Raises :class:`GatewayError` when no replica could serve it. Tokens are never yielded
        twice, also across a resume.
        """
        deadline = req.deadline or time.monotonic() + self.timeout_s
        sampling = sampling_to_proto(req.sampling)
        output: list[int] = []
        exclude: list[str] = []
        last_error: GatewayError | None = None
        prefix = routing_keys(req.prompt_ids)  # cache-aware routing (scheduler/balancer.py)
        for attempt in range(self.max_attempts):
            try:
                replica = await _pick_for(self.picker, req, exclude, prefix)
            except GatewayError:
                if last_error is not None:
                    raise last_error from None
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError(504, "the request's deadline passed")
            stream = self._stream(replica.address)
            rid = attempt_request_id(req.request_id, attempt)
            trace = dict(req.trace_headers)
            events = await stream.submit(attention_pb2.StreamSubmit(
                request=attention_pb2.GenerateRequest(
                    request_id=rid, prompt_token_ids=req.prompt_ids, sampling=sampling,
                    output_token_ids=output),
                arrival_unix_ns=req.arrival_unix_ns, traceparent=trace.get("traceparent", ""),
                tracestate=trace.get("tracestate", "")))
            self.picker.started(replica)
            failed = finished = False
            try:
                while True:
                    item = await _next_event(events, deadline)
                    failure = _failure_of(item)
                    if failure is None:
                        ev = item.event
                        ids = list(ev.token_ids)
                        skip = len(output) - ev.index  # > 0: duplicates of tokens already sent
                        lps = _lps(ev.logprobs) if req.sampling.logprobs is not None else None
                        if skip > 0:
                            ids = ids[skip:]
                            lps = lps[skip:] if lps is not None else None
                        output.extend(ids)
                        reason = FinishReason.from_proto(ev.finish_reason)
                        finished = reason is not None
                        if reason is FinishReason.ERROR and not output:
                            # Nothing was streamed: another replica may well succeed.
                            failed = True
                            last_error = GatewayError(503, f"replica {replica.node_id}: "
                                                      f"{ev.error_message or 'request failed'}")
                            break
                        yield ReplicaEvent(ids, reason, ev.usage.prompt_tokens,
                                           max(ev.usage.completion_tokens, len(output)),
                                           ev.error_message, lps,
                                           _lps(ev.prompt_logprobs) if ev.prompt_logprobs
                                           else None)
                        if finished:
                            return
                        continue
                    code, details = failure
                    finished = item is not None  # refused or call broken: nothing runs there
                    err = status_to_gateway(code, details, f"replica {replica.node_id}")
                    retry = code == grpc.StatusCode.UNAVAILABLE or (
                        code == grpc.StatusCode.RESOURCE_EXHAUSTED and not output)
                    if not retry:
                        raise err
                    failed = code == grpc.StatusCode.UNAVAILABLE
                    last_error = err
                    break
            finally:
                if not finished:  # deadline, or the caller stopped reading: abort downstream
                    stream.abort(rid, req.ended_as)
                self.picker.finished(replica, failed)
            exclude.append(replica.node_id)
            reason = "resume" if output else "failover"
            self.metrics.retries.labels(reason=reason).inc()
            log.warning("request %s: %s on replica %s after %d tokens; %s", req.request_id,
                        last_error.message if last_error else "failure", replica.node_id,
                        len(output), "resuming elsewhere" if output else "trying another")
        assert last_error is not None
        raise last_error


async def _pick_for(picker: ReplicaPicker, req: GenRequest, exclude: Sequence[str],
                    prefix: Sequence[int]) -> Replica:
    """The replica for ``req``'s next attempt: its group's, unless that one is excluded."""
    group = req.group
    if group is None:
        return await picker.pick(len(req.prompt_ids), exclude, prefix)
    async with group.lock:
        if group.replica is None or group.replica.node_id in exclude:
            group.replica = await picker.pick(len(req.prompt_ids), exclude, prefix)
        return group.replica


def _failure_of(item: attention_pb2.StreamEvent | ReplicaFailure | None
                ) -> tuple[grpc.StatusCode, str] | None:
    """(status, details) of an item that ends the attempt; None for a GenerateEvent."""
    if item is None:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
    if isinstance(item, ReplicaFailure):
        return item.code, item.details
    if item.rejected_code:
        return (STATUS_BY_NUMBER.get(item.rejected_code, grpc.StatusCode.UNKNOWN),
                item.rejected_message)
    return None


async def _next_event(events: asyncio.Queue, deadline: float
                      ) -> attention_pb2.StreamEvent | ReplicaFailure | None:
    """The request's next item; None once ``deadline`` (time.monotonic()) has passed.

    Not ``asyncio.wait_for``: on Python 3.11 it returns the item and drops a cancellation
    that arrives as the item does, and then a request whose client went away runs on to its
    end. ``asyncio.timeout`` never loses a cancellation."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await events.get()
    except TimeoutError:
        return None
