"""Pick an attention replica and stream a request's tokens from it (DESIGN.md §3 steps 2-3, 8).

Replicas come from a static list (``--attention``: the one with the fewest of this gateway's
requests in flight, a replica that just failed is skipped for a cool-down) or from the
scheduler's ``PickReplica`` (``--scheduler``). :meth:`Backend.stream` retries another replica
when one is UNAVAILABLE or full before anything was streamed, and *resumes* on another replica
(``output_token_ids`` = tokens already streamed) when one breaks mid-stream, deduplicating by
the events' ``index``. Closing the iterator cancels the downstream call, which aborts the
request on the replica.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from megascale.v1 import (
    attention_pb2,
    attention_pb2_grpc,
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.common.grpcserver import MAX_MESSAGE_BYTES
from services.gateway.errors import GatewayError, rpc_error_to_gateway
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger("megascale.gateway")

ARRIVAL_KEY = "x-megascale-arrival-unix-ns"
FAILED_COOLDOWN_S = 5.0
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
FINISH_NAMES = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                common_pb2.FINISH_REASON_ABORT: "abort", common_pb2.FINISH_REASON_ERROR: "error"}


def outgoing_metadata(arrival_unix_ns: int, trace_headers: Sequence[tuple[str, str]] = ()
                      ) -> list[tuple[str, str]]:
    """The gRPC metadata sent with every downstream call: the client's arrival time and the
    W3C ``traceparent``/``tracestate`` of the gateway's span (see services/common/tracing)."""
    return [(ARRIVAL_KEY, str(arrival_unix_ns)), *trace_headers]


@dataclass(frozen=True)
class Replica:
    node_id: str
    address: str


@dataclass
class BackendRequest:
    """One generation request as the gateway sends it downstream."""

    request_id: str
    prompt_ids: list[int]
    sampling: common_pb2.SamplingParams
    arrival_unix_ns: int = field(default_factory=time.time_ns)
    deadline: float | None = None  # time.monotonic() deadline; None = the config's timeout
    trace_headers: list[tuple[str, str]] = field(default_factory=list)  # W3C, to propagate


@dataclass
class ReplicaEvent:
    """New tokens from the replica (deduplicated across resumes)."""

    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str = ""


class ReplicaPicker(Protocol):
    async def pick(self, prompt_tokens: int, exclude: Sequence[str]) -> Replica: ...
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

    async def pick(self, prompt_tokens: int, exclude: Sequence[str]) -> Replica:
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
        self.in_flight[replica.node_id] += 1

    def finished(self, replica: Replica, failed: bool) -> None:
        self.in_flight[replica.node_id] -= 1
        if failed:
            self.failed_at[replica.node_id] = time.monotonic()
        else:
            self.failed_at.pop(replica.node_id, None)

    async def close(self) -> None:
        return None


class SchedulerPicker:
    """Ask the scheduler's ``PickReplica`` (least-loaded healthy replica) for every request."""

    def __init__(self, address: str, model: str, timeout_s: float = 2.0) -> None:
        self.address = address
        self.model = model
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None

    async def pick(self, prompt_tokens: int, exclude: Sequence[str]) -> Replica:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        try:
            resp = await stub.PickReplica(scheduler_pb2.PickReplicaRequest(
                prompt_tokens=prompt_tokens, exclude_node_ids=list(exclude), model=self.model),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = rpc_error_to_gateway(exc, f"scheduler {self.address}")
            if err.status == 400:  # our request was wrong: not the client's fault
                err = GatewayError(502, f"scheduler {self.address}: {err.message}")
            raise err from None
        return Replica(resp.node_id or resp.address, resp.address)

    def started(self, replica: Replica) -> None:
        return None

    def finished(self, replica: Replica, failed: bool) -> None:
        return None

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

    def _stub(self, address: str) -> attention_pb2_grpc.AttentionStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address, _CHANNEL_OPTIONS)
        return attention_pb2_grpc.AttentionStub(ch)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        await self.picker.close()

    async def stream(self, req: BackendRequest) -> AsyncIterator[ReplicaEvent]:
        """Yield the request's tokens until an event with ``finish_reason``.

        Raises :class:`GatewayError` when no replica could serve it. Tokens are never yielded
        twice, also across a resume.
        """
        deadline = req.deadline or time.monotonic() + self.timeout_s
        output: list[int] = []
        exclude: list[str] = []
        last_error: GatewayError | None = None
        for attempt in range(self.max_attempts):
            try:
                replica = await self.picker.pick(len(req.prompt_ids), exclude)
            except GatewayError:
                if last_error is not None:
                    raise last_error from None
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError(504, "the request's deadline passed")
            call = self._stub(replica.address).Generate(
                attention_pb2.GenerateRequest(
                    request_id=f"{req.request_id[:110]}.{attempt}",
                    prompt_token_ids=req.prompt_ids, sampling=req.sampling,
                    output_token_ids=output),
                metadata=outgoing_metadata(req.arrival_unix_ns, req.trace_headers),
                timeout=remaining)
            self.picker.started(replica)
            failed = False
            try:
                async for ev in call:
                    ids = list(ev.token_ids)
                    skip = len(output) - ev.index  # > 0: duplicates of tokens already sent
                    if skip > 0:
                        ids = ids[skip:]
                    output.extend(ids)
                    reason = FINISH_NAMES.get(ev.finish_reason)
                    if reason == "error" and not output:
                        # Nothing was streamed: another replica may well succeed.
                        failed = True
                        last_error = GatewayError(503, f"replica {replica.node_id}: "
                                                  f"{ev.error_message or 'request failed'}")
                        break
                    yield ReplicaEvent(ids, reason, ev.usage.prompt_tokens,
                                       max(ev.usage.completion_tokens, len(output)),
                                       ev.error_message)
                    if reason is not None:
                        return
                else:
                    failed = True
                    last_error = GatewayError(503, f"replica {replica.node_id} ended the "
                                              "stream without finishing the request")
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                err = rpc_error_to_gateway(exc, f"replica {replica.node_id}")
                retry = code == grpc.StatusCode.UNAVAILABLE or (
                    code == grpc.StatusCode.RESOURCE_EXHAUSTED and not output)
                if not retry:
                    raise err from None
                failed = code == grpc.StatusCode.UNAVAILABLE
                last_error = err
            finally:
                call.cancel()  # no-op when finished; aborts the request on the replica otherwise
                self.picker.finished(replica, failed)
            exclude.append(replica.node_id)
            reason = "resume" if output else "failover"
            self.metrics.retries.labels(reason=reason).inc()
            log.warning("request %s: %s on replica %s after %d tokens; %s", req.request_id,
                        last_error.message if last_error else "failure", replica.node_id,
                        len(output), "resuming elsewhere" if output else "trying another")
        assert last_error is not None
        raise last_error
