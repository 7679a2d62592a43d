"""The client side of scheduler membership: register, heartbeat, follow the placement.

A role server creates one :class:`NodeRegistration` and calls :meth:`~NodeRegistration.start`
once it serves, :meth:`~NodeRegistration.stop` when it shuts down::

    reg = NodeRegistration("127.0.0.1:7000", node_info, load_fn=engine.load_report,
                           on_placement=engine.apply_placement, on_settings=apply_settings)
    await reg.start()
    ...
    await reg.stop()          # Deregister (best effort) so the epoch moves at once

Behaviour:
- Register, then Heartbeat every ``lease_ttl_s / 3`` with ``load_fn()``'s LoadReport.
- Heartbeat NOT_FOUND (the lease expired, Redis restarted, the scheduler lost state) ->
  Register again at once. UNAVAILABLE / DEADLINE_EXCEEDED (scheduler restarting) -> retry with
  capped exponential backoff; the channel reconnects by itself.
- INVALID_ARGUMENT / ALREADY_EXISTS on Register are logged (once per distinct message) and
  retried slowly: they are configuration problems the host should see in its log, not crashes.
- After Register and whenever a Heartbeat says ``placement_changed``, GetPlacement is called
  and ``on_placement(placement)`` runs if the epoch is newer than the last one delivered
  (the scheduler also pushes UpdatePlacement; both paths are idempotent by epoch).
- ``on_settings(settings)`` runs after each Register whose DeploymentSettings differ from the
  last ones delivered.
- Nothing here raises into the host: callback and ``load_fn`` errors are logged.

Callbacks may be plain functions or coroutine functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from megascale.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common import auth

log = logging.getLogger("megascale.registration")

_RETRY_SLOW_S = 5.0  # between Register attempts the scheduler refused (config problems)


async def _call(fn: Callable[..., Any] | None, *args: Any) -> Any:
    if fn is None:
        return None
    out = fn(*args)
    if inspect.isawaitable(out):
        out = await out
    return out


class NodeRegistration:
    """Keeps one node registered with the scheduler (module docstring)."""

    def __init__(self, scheduler_addr: str, node_info: common_pb2.NodeInfo,
                 load_fn: Callable[[], Any] | None = None,
                 on_placement: Callable[[common_pb2.ExpertPlacement], Any] | None = None,
                 on_settings: Callable[[common_pb2.DeploymentSettings], Any] | None = None,
                 rpc_timeout_s: float = 2.0, max_backoff_s: float = 2.0) -> None:
        self.scheduler_addr = scheduler_addr
        self.node_info = node_info
        self.load_fn = load_fn
        self.on_placement = on_placement
        self.on_settings = on_settings
        self.rpc_timeout_s = rpc_timeout_s
        self.max_backoff_s = max_backoff_s
        self.epoch = 0                 # membership epoch last heard from the scheduler
        self.lease_ttl_s = 0.0
        self.placement_epoch = 0       # epoch of the last placement given to on_placement
        self.settings: common_pb2.DeploymentSettings | None = None
        self.registrations = 0         # successful Register calls (re-registrations included)
        self._registered = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._stub: scheduler_pb2_grpc.SchedulerStub | None = None
        self._task: asyncio.Task | None = None
        self._last_error = ""

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def start(self) -> None:
        """Start the background loop (returns at once; see :meth:`wait_registered`)."""
        if self._task is not None:
            return
        self._channel = auth.channel(self.scheduler_addr)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._task = asyncio.create_task(self._run(), name=f"register-{self.node_info.node_id}")

    async def wait_registered(self, timeout_s: float | None = None) -> bool:
        """True once registered (False if ``timeout_s`` passed first)."""
        try:
            await asyncio.wait_for(self._registered.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating; Deregister (best effort, short deadline) when registered."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if deregister and self.registered and self._stub is not None:
            try:
                await self._stub.Deregister(
                    scheduler_pb2.DeregisterRequest(node_id=self.node_info.node_id),
                    timeout=min(1.0, self.rpc_timeout_s))
            except grpc.aio.AioRpcError as exc:
                log.info("deregister of %s failed: %s", self.node_info.node_id,
                         exc.code().name)
        self._registered.clear()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # ---- the loop -----------------------------------------------------------------------

    def _warn(self, msg: str) -> None:
        if msg != self._last_error:
            log.warning("%s", msg)
            self._last_error = msg

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if not self.registered:
                    wait = await self._register()
                else:
                    wait = await self._heartbeat()
                backoff = 0.05 if wait is None else backoff
                await asyncio.sleep(wait if wait is not None
                                    else max(0.05, self.lease_ttl_s / 3))
            except grpc.aio.AioRpcError as exc:
                # Transient: scheduler restarting or unreachable, Redis down behind it.
                self._warn(f"scheduler {self.scheduler_addr}: {exc.code().name}: "
                           f"{exc.details()}")
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never take the host down
                log.exception("registration loop error (retrying)")
                await asyncio.sleep(self.max_backoff_s)

    async def _register(self) -> float | None:
        """Register; returns a delay override (slow retry after a refusal) or None."""
        assert self._stub is not None
        try:
            resp = await self._stub.Register(self.node_info, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.ALREADY_EXISTS):
                self._warn(f"scheduler refused node {self.node_info.node_id}: "
                           f"{exc.code().name}: {exc.details()}")
                return _RETRY_SLOW_S
            raise
        self.epoch = resp.epoch
        self.lease_ttl_s = resp.lease_ttl_s
        self.registrations += 1
        self._registered.set()
        self._last_error = ""
        log.info("node %s registered with %s (epoch %d, lease %.3g s)",
                 self.node_info.node_id, self.scheduler_addr, resp.epoch, resp.lease_ttl_s)
        if resp.HasField("settings") and resp.settings != self.settings:
            self.settings = resp.settings
            await self._deliver(self.on_settings, resp.settings)
        await self._refresh_placement()
        return None

    async def _heartbeat(self) -> float | None:
        assert self._stub is not None
        load = await self._load()
        try:
            resp = await self._stub.Heartbeat(
                scheduler_pb2.HeartbeatRequest(node_id=self.node_info.node_id, load=load),
                timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                log.info("lease of %s is gone: registering again", self.node_info.node_id)
                self._registered.clear()
                return 0.0
            raise
        self.epoch = resp.epoch
        if resp.placement_changed:
            await self._refresh_placement()
        return None

    async def _load(self) -> common_pb2.LoadReport:
        try:
            load = await _call(self.load_fn)
        except Exception:  # noqa: BLE001
            log.exception("load_fn failed; sending an empty load report")
            load = None
        load = load if isinstance(load, common_pb2.LoadReport) else common_pb2.LoadReport()
        if not load.reported_at_unix_s:
            load.reported_at_unix_s = time.time()
        return load

    async def _refresh_placement(self) -> None:
        assert self._stub is not None
        p = await self._stub.GetPlacement(scheduler_pb2.GetPlacementRequest(),
                                          timeout=self.rpc_timeout_s)
        if p.epoch > self.placement_epoch:
            self.placement_epoch = p.epoch
            await self._deliver(self.on_placement, p)

    async def _deliver(self, fn: Callable[..., Any] | None, arg: Any) -> None:
        try:
            await _call(fn, arg)
        except Exception:  # noqa: BLE001
            log.exception("registration callback %s failed", getattr(fn, "__name__", fn))
