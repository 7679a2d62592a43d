"""One multiplexed ``Attention.GenerateStream`` call per attention replica, shared by all of
this gateway's requests to it (attention.proto).

Why not one ``Generate`` call per request: each gRPC message costs ~40 us of the replica's
event loop, which shares the replica's core with its engine; at a batch of 1024 decoding, one
message per request and token is a large share of every step. On the shared call the replica
sends each delivery burst (all requests' new tokens of a step) as one message.

The call opens with the first request and stays open. When it breaks (the replica died or
restarted), every request on it gets a :class:`ReplicaFailure` and the next request opens a
new call. A replica that stops answering without breaking the call (frozen, or its host gone
without a reset) is found by a watchdog: when requests wait and nothing has arrived for
:data:`STALL_S`, it probes the replica with ``GetLoad``; no answer within
:data:`PROBE_TIMEOUT_S` ends the call (UNAVAILABLE), so its requests resume elsewhere. A live
replica answers the probe even while its requests wait (queued, or paused for lost experts).
Per-request deadlines are the caller's (:class:`services.gateway.backend.Backend`):
it stops waiting and calls :meth:`ReplicaStream.abort`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from megascale.v1 import attention_pb2, attention_pb2_grpc
from services.core.request import FinishReason

log = logging.getLogger("megascale.gateway")

STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
STALL_S = 3.0          # requests waiting and nothing read for this long: probe the replica
PROBE_TIMEOUT_S = 2.0  # a replica that does not answer GetLoad within this is given up


class ReplicaFailure(Exception):
    """The replica refused a request (the status Generate would have ended with) or the shared
    call broke; ``code`` is a gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(eq=False)
class _Call:
    """One GenerateStream call and the requests waiting on it (request_id -> their queue)."""

    call: grpc.aio.StreamStreamCall
    subs: dict[str, asyncio.Queue] = field(default_factory=dict)
    dead: bool = False
    reader: asyncio.Task | None = None
    watchdog: asyncio.Task | None = None
    last_read: float = field(default_factory=time.monotonic)
    stalled: bool = False  # the watchdog ended it: the replica stopped answering


class ReplicaStream:
    """The shared GenerateStream call to one replica (module docstring)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = attention_pb2_grpc.AttentionStub(channel)
        self._current: _Call | None = None
        self._write = asyncio.Lock()  # grpc.aio allows one write in flight per call
        self._aborts: set[asyncio.Task] = set()

    async def submit(self, submit: attention_pb2.StreamSubmit) -> asyncio.Queue:
        """Start a request. Its queue yields the request's ``StreamEvent`` objects, ending with
        one whose ``event.finish_reason`` or ``rejected_code`` is set, or with a
        :class:`ReplicaFailure` when the call breaks first."""
        c = self._current
        if c is None or c.dead:
            c = self._current = _Call(self._stub.GenerateStream())
            c.reader = asyncio.create_task(self._read(c))
            c.watchdog = asyncio.create_task(self._watch(c))
        rid = submit.request.request_id
        events: asyncio.Queue = asyncio.Queue()
        c.subs[rid] = events  # before the write: the answer may come before it returns
        try:
            async with self._write:
                await c.call.write(attention_pb2.GenerateStreamRequest(submit=submit))
        except asyncio.CancelledError:  # the caller went away: it may have been sent
            self.abort(rid)
            raise
        except Exception as exc:  # noqa: BLE001 - the call is gone; its reader says why
            if c.subs.pop(rid, None) is not None:
                events.put_nowait(ReplicaFailure(grpc.StatusCode.UNAVAILABLE,
                                                 f"cannot send on the stream: {exc}"))
        return events

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Stop a request the caller no longer waits for (sent in the background); ``reason``
        is what the replica counts it as."""
        c = self._current
        if c is None or c.dead or c.subs.pop(request_id, None) is None:
            return  # finished, or its call broke (the replica aborts the call's requests)
        task = asyncio.create_task(self._send_abort(c, request_id, reason))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _send_abort(self, c: _Call, request_id: str, reason: FinishReason) -> None:
        try:
            async with self._write:
                await c.call.write(attention_pb2.GenerateStreamRequest(
                    abort=attention_pb2.AbortRequest(request_id=request_id,
                                                     reason=reason.proto)))
        except Exception as exc:  # noqa: BLE001 - the call broke: the replica aborted it
            log.debug("abort of %s not sent: %s", request_id, exc)

    async def _watch(self, c: _Call) -> None:
        """End ``c`` when its replica stops answering (module docstring)."""
        while not c.dead:
            await asyncio.sleep(STALL_S / 3)
            if c.dead or not c.subs or time.monotonic() - c.last_read < STALL_S:
                continue
            try:
                await self._stub.GetLoad(attention_pb2.GetLoadRequest(),
                                         timeout=PROBE_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if c.dead:
                    return
                log.warning("replica stopped answering (%d requests waiting, nothing for %.1f "
                            "s, GetLoad: %s): ending its stream, the requests resume elsewhere",
                            len(c.subs), time.monotonic() - c.last_read, exc.code().name)
                c.stalled = True
                c.call.cancel()
                return
            c.last_read = time.monotonic()  # alive: probe again after another STALL_S

    async def _read(self, c: _Call) -> None:
        failure = ReplicaFailure(grpc.StatusCode.UNAVAILABLE, "the replica ended the stream")
        stalled = ReplicaFailure(grpc.StatusCode.UNAVAILABLE,
                                 f"the replica stopped answering (no GetLoad answer within "
                                 f"{PROBE_TIMEOUT_S:g} s)")
        try:
            while True:
                msg = await c.call.read()
                c.last_read = time.monotonic()
                if msg is grpc.aio.EOF:
                    break
                for se in msg.events:
                    events = c.subs.get(se.request_id)
                    if events is None:
                        continue  # aborted by us meanwhile
                    events.put_nowait(se)
                    if se.rejected_code or se.event.finish_reason:
                        del c.subs[se.request_id]
        except grpc.aio.AioRpcError as exc:
            failure = stalled if c.stalled else ReplicaFailure(
                exc.code(), exc.details() or exc.code().name)
        except asyncio.CancelledError:
            if c.stalled:  # the watchdog cancelled the call, not this task
                failure = stalled
            else:
                failure = ReplicaFailure(grpc.StatusCode.CANCELLED,
                                         "the gateway is shutting down")
                raise
        finally:
            c.dead = True
            for events in c.subs.values():
                events.put_nowait(failure)
            c.subs.clear()

    async def close(self) -> None:
        c, self._current = self._current, None
        if c is not None:
            if c.watchdog is not None:
                c.watchdog.cancel()
            c.call.cancel()
            if c.reader is not None:
                await asyncio.gather(c.reader, return_exceptions=True)
