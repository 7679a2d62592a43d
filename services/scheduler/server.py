"""The ``megascale.v1.Scheduler`` gRPC service and the scheduler process's :func:`serve`.

Status codes follow ``proto/megascale/v1/scheduler.proto``: INVALID_ARGUMENT names the bad
field, NOT_FOUND tells a node its lease is gone (Register again), ALREADY_EXISTS guards a live
node id, UNAVAILABLE covers "no replica" and "Redis unreachable", RESOURCE_EXHAUSTED "every
replica is full". GetPlacement returns the last complete placement; its trailing metadata says
whether the newest plan was complete (``x-megascale-placement-complete: true|false``) and, if
not, which experts have no live host (``x-megascale-placement-missing: 3,5``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from megascale.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common import auth
from services.common.lifecycle import RoleLifecycle
from services.errors import ConfigError
from services.scheduler.balancer import AllFull, Balancer, NoReplica
from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import Controller
from services.scheduler.metrics import ROLE_NAMES, SchedulerMetrics, role_name
from services.scheduler.state import REDIS_ERRORS, AlreadyRegistered, NodeRecord, RedisState

log = logging.getLogger("megascale.scheduler")

T = TypeVar("T")
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_REPORTED_DOWN = 1024  # expert node ids one LoadReport may name
_M2N_RE = re.compile(r"^(shm|tcp|rdma)://\S+$")
COMPLETE_KEY = "x-megascale-placement-complete"
MISSING_KEY = "x-megascale-placement-missing"


class BadRequest(ValueError):
    """A request field is invalid (INVALID_ARGUMENT); the message names it."""


def check_node_id(node_id: str, field: str = "node_id") -> None:
    if not _NODE_ID_RE.match(node_id):
        raise BadRequest(f"{field} must be 1..128 chars of [A-Za-z0-9._-], got {node_id!r}")


def check_address(address: str, field: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadRequest(f"{field} must be HOST:PORT with a port in 1..65535, got {address!r}")


def validate_node_info(info: common_pb2.NodeInfo, num_experts: int) -> None:
    """Raise :class:`BadRequest` naming the first bad field of a Register request."""
    check_node_id(info.node_id, "node_id")
    if info.role not in ROLE_NAMES:
        raise BadRequest(f"role must be one of {sorted(ROLE_NAMES.values())}, got "
                         f"{common_pb2.NodeRole.Name(info.role) if info.role == 0 else info.role}")
    check_address(info.grpc_address, "grpc_address")
    if info.m2n_url and not _M2N_RE.match(info.m2n_url):
        raise BadRequest(f"m2n_url must be shm://, tcp:// or rdma://..., got {info.m2n_url!r}")
    if info.role == common_pb2.NODE_ROLE_EXPERT:
        if not info.m2n_url:
            raise BadRequest("m2n_url is required for an expert node")
        if not info.expert_ids and not info.elastic:
            raise BadRequest("expert_ids must name at least one expert for an expert node "
                             "(or elastic be set: --experts auto)")
        bad = [e for e in info.expert_ids if e >= num_experts]
        if bad:
            raise BadRequest(f"expert_ids {bad} out of range: the model has {num_experts} "
                             f"experts")
        if len(set(info.expert_ids)) != len(info.expert_ids):
            raise BadRequest("expert_ids must be unique")
    if info.role == common_pb2.NODE_ROLE_ATTENTION:
        for field in ("kv_blocks", "kv_block_size", "max_running_requests"):
            if getattr(info, field) < 1:
                raise BadRequest(f"{field} must be >= 1 for an attention replica")


def validate_load(load: common_pb2.LoadReport) -> None:
    if not (math.isfinite(load.kv_usage) and 0.0 <= load.kv_usage <= 1.0):
        raise BadRequest(f"load.kv_usage must be in 0..1, got {load.kv_usage}")
    for field in ("step_time_ms", "attention_time_ms", "expert_wait_ms", "tokens_per_s",
                  "reported_at_unix_s"):
        v = getattr(load, field)
        if not (math.isfinite(v) and v >= 0):
            raise BadRequest(f"load.{field} must be a finite number >= 0, got {v}")
    if len(load.expert_nodes_down) > MAX_REPORTED_DOWN:
        raise BadRequest(f"load.expert_nodes_down names {len(load.expert_nodes_down)} nodes, "
                         f"more than {MAX_REPORTED_DOWN}")
    for node_id in load.expert_nodes_down:
        check_node_id(node_id, "load.expert_nodes_down")


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """``megascale.v1.Scheduler``: membership, replica picking, placement and settings."""

    def __init__(self, config: SchedulerConfig, state: RedisState, controller: Controller,
                 metrics: SchedulerMetrics) -> None:
        self.config = config
        self.state = state
        self.controller = controller
        self.metrics = metrics
        self.balancer = Balancer()
        s = config.settings
        self.settings = common_pb2.DeploymentSettings(
            micro_batches=s.micro_batches, max_batch_tokens=s.max_batch_tokens,
            max_running_requests=s.max_running_requests,
            dispatch_timeout_ms=s.dispatch_timeout_ms)

    async def _redis(self, context: grpc.aio.ServicerContext, op: Awaitable[T]) -> T:
        """Await a Redis operation; UNAVAILABLE with a one-line message when Redis is down."""
        try:
            return await op
        except REDIS_ERRORS as exc:
            self.metrics.redis_errors.inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"Redis at {self.state.url} is unreachable: {exc}")
            raise  # unreachable: abort raises

    async def _bad(self, context: grpc.aio.ServicerContext, exc: BadRequest) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _check_speaks_for(self, context: grpc.aio.ServicerContext, role: int,
                                node_id: str) -> None:
        """PERMISSION_DENIED unless the proven caller (services/common/auth.py) may act for
        node ``node_id`` of ``role``: a node speaks for itself, in its own role; the
        scheduler and an operator for any node. Nothing is checked on an unchecked server."""
        who = auth.caller()
        if who is None or who.role in ("scheduler", "admin"):
            return
        if who.role != role_name(role):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"a {who.role} may not act for {role_name(role)} node "
                                f"{node_id!r}")
        if who.node_id is not None and who.node_id != node_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the {who.role} credential of node {who.node_id!r} may not "
                                f"act for node {node_id!r}")

    async def Register(self, request: common_pb2.NodeInfo, context: grpc.aio.ServicerContext
                       ) -> scheduler_pb2.RegisterResponse:
        """Start a lease for the node; the membership epoch moves when it (re)joins.
        PERMISSION_DENIED when the caller's role is not ``request.role``."""
        try:
            validate_node_info(request, self.config.num_experts)
        except BadRequest as exc:
            await self._bad(context, exc)
        await self._check_speaks_for(context, request.role, request.node_id)
        try:
            epoch = await self._redis(context, self.state.register(request))
        except AlreadyRegistered:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"node_id {request.node_id!r} is held by a live node at "
                                f"another address")
        self.metrics.registrations.labels(role=role_name(request.role)).inc()
        self.controller.note_register(request)
        self.balancer.on_report(request.node_id)
        self.balancer.prefixes.forget_node(request.node_id)  # a (re)started replica's cache
        self.controller.kick()
        log.info("node %s (%s) registered at %s, epoch %d", request.node_id,
                 role_name(request.role), request.grpc_address, epoch)
        return scheduler_pb2.RegisterResponse(epoch=epoch, lease_ttl_s=self.config.node_ttl_s,
                                              settings=self.settings)

    async def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> scheduler_pb2.HeartbeatResponse:
        """Renew the lease and store the load report; NOT_FOUND when the lease is gone."""
        try:
            check_node_id(request.node_id)
            validate_load(request.load)
        except BadRequest as exc:
            await self._bad(context, exc)
        if auth.caller() is not None:
            role = self.controller.role_of(request.node_id)  # the view: no Redis read here
            if role is not None:
                await self._check_speaks_for(context, role, request.node_id)
        found, changed, epoch = await self._redis(context, self.state.heartbeat(
            request.node_id, request.load, self.controller.current.epoch))
        if not found:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"node {request.node_id!r} is not registered (lease expired?): "
                                f"Register again")
        self.controller.note_load(request.node_id, request.load)
        self.balancer.on_report(request.node_id)
        return scheduler_pb2.HeartbeatResponse(epoch=epoch, placement_changed=changed)

    async def Deregister(self, request: scheduler_pb2.DeregisterRequest,
                         context: grpc.aio.ServicerContext) -> scheduler_pb2.DeregisterResponse:
        """Leave now; NOT_FOUND when the node was not registered, PERMISSION_DENIED when the
        caller is not the node (its role) or the scheduler/an operator."""
        try:
            check_node_id(request.node_id)
        except BadRequest as exc:
            await self._bad(context, exc)
        who = auth.caller()
        if who is not None and who.role not in ("scheduler", "admin"):
            records = await self._redis(context, self.state.nodes())
            rec = next((r for r in records if r.info.node_id == request.node_id), None)
            if rec is not None:
                await self._check_speaks_for(context, rec.info.role, request.node_id)
        epoch = await self._redis(context, self.state.deregister(request.node_id))
        if epoch is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"node {request.node_id!r} is not registered")
        self.metrics.deregistrations.inc()
        self.controller.note_leave(request.node_id)
        self.controller.kick()
        log.info("node %s deregistered, epoch %d", request.node_id, epoch)
        return scheduler_pb2.DeregisterResponse(epoch=epoch)

    async def PickReplica(self, request: scheduler_pb2.PickReplicaRequest,
                          context: grpc.aio.ServicerContext
                          ) -> scheduler_pb2.PickReplicaResponse:
        """The least-loaded healthy attention replica not in ``exclude_node_ids``.

        Chosen from the controller's view of the nodes (refreshed every sweep, updated by
        every Register/Heartbeat/Deregister), not a Redis read per request; only a view
        older than two sweeps is read afresh, and while Redis is down the last view serves
        (without trying Redis per request: the sweep finds out when it is back).
        """
        records = self.controller.records(2 * self.config.sweep_interval_s)
        read_now = records is None
        if records is None:
            stale = self.controller.records(float("inf"))
            if stale and self.controller.redis_down:
                records, read_now = stale, False
            elif stale:  # Redis may be down: the last view beats refusing every request
                try:
                    records = await self.controller.read_nodes()
                except REDIS_ERRORS:
                    self.metrics.redis_errors.inc()
                    records, read_now = stale, False
            else:
                records = await self._redis(context, self.controller.read_nodes())
        try:
            rec = self._pick(records, request)
        except (NoReplica, AllFull) as exc:
            refusal: Exception = exc
            rec = None
            if not read_now and not self.controller.redis_down:
                # a refusal is decided on what Redis holds now, not the view
                try:
                    records = await self.controller.read_nodes()
                    rec = self._pick(records, request)
                except (NoReplica, AllFull) as again:
                    refusal = again
                except REDIS_ERRORS:
                    self.metrics.redis_errors.inc()
            if rec is None:
                exhausted = isinstance(refusal, AllFull)
                self.metrics.picks.labels(result="exhausted" if exhausted
                                          else "unavailable").inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if exhausted
                                    else grpc.StatusCode.UNAVAILABLE, str(refusal))
        self.metrics.picks.labels(result="ok").inc()
        return scheduler_pb2.PickReplicaResponse(node_id=rec.info.node_id,
                                                 address=rec.info.grpc_address,
                                                 epoch=self.controller.membership_epoch)

    def _pick(self, records: list[NodeRecord], request: scheduler_pb2.PickReplicaRequest
              ) -> NodeRecord:
        routed = self.balancer.prefix_routed
        rec = self.balancer.pick(records, exclude=request.exclude_node_ids,
                                 prompt_tokens=request.prompt_tokens, model=request.model,
                                 prefix_hashes=request.prefix_hashes)
        if self.balancer.prefix_routed > routed:
            self.metrics.prefix_picks.inc()
        return rec

    def _placement_metadata(self, context: grpc.aio.ServicerContext) -> None:
        missing = self.controller.missing
        md = [(COMPLETE_KEY, "false" if missing else "true")]
        if missing:
            md.append((MISSING_KEY, ",".join(map(str, missing))))
        context.set_trailing_metadata(tuple(md))

    async def GetPlacement(self, request: scheduler_pb2.GetPlacementRequest,
                           context: grpc.aio.ServicerContext) -> common_pb2.ExpertPlacement:
        """The last complete placement (epoch 0 = none yet); completeness in trailing metadata."""
        self._placement_metadata(context)
        return self.controller.current

    async def WatchPlacement(self, request: scheduler_pb2.WatchPlacementRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[common_pb2.ExpertPlacement]:
        """Stream every placement with epoch > ``after_epoch`` until the caller cancels."""
        after = request.after_epoch
        while True:
            placement = await self.controller.wait_placement(after)
            yield placement
            after = placement.epoch

    async def GetSettings(self, request: scheduler_pb2.GetSettingsRequest,
                          context: grpc.aio.ServicerContext) -> common_pb2.DeploymentSettings:
        return self.settings


async def _connect(state: RedisState, timeout_s: float = 10.0) -> None:
    """Wait for Redis at start-up; ConfigError naming the URL when it never answers."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await state.ping()
            return
        except REDIS_ERRORS as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise ConfigError(f"cannot reach Redis at {state.url}: {exc}") from None
            await asyncio.sleep(0.2)


class Scheduler:
    """A running scheduler (servers + control loop), for :func:`serve` and in-process tests."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.metrics = SchedulerMetrics()
        self.state = RedisState(config.redis_url, config.key_prefix, config.node_ttl_s)
        self.controller = Controller(config, self.state, self.metrics)
        self.servicer = SchedulerServicer(config, self.state, self.controller, self.metrics)
        self.life = RoleLifecycle("scheduler", config.node_id, config.host)
        self._stack = contextlib.AsyncExitStack()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return self.life.grpc_address

    @property
    def port(self) -> int:
        return self.life.grpc_port

    @property
    def metrics_port(self) -> int | None:
        return self.life.metrics_port

    async def start(self) -> None:
        """Connect to Redis, start the gRPC server, metrics and the control loop."""
        life = await self._stack.enter_async_context(self.life)
        try:
            life.defer(self.state.close)
            await _connect(self.state)
            life.defer(self.controller.close)
            await self.controller.start()
            life.defer(self._stop_loop)
            await life.start_grpc(
                self.config.grpc_port,
                lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, s),
                [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name])
            life.serve_metrics(self.metrics.registry, self.config.metrics_port)
        except BaseException:
            await self._stack.aclose()
            raise
        self._loop_task = asyncio.create_task(self.controller.run(self._stop))

    async def _stop_loop(self) -> None:
        self._stop.set()
        if self._loop_task is not None:
            await self._loop_task

    async def stop(self) -> None:
        """Stop serving, then the control loop, then close Redis (RoleLifecycle's order)."""
        await self._stack.aclose()


async def serve(config: SchedulerConfig, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the scheduler until ``stop`` is set (or forever)."""
    sched = Scheduler(config)
    await sched.start()
    try:
        await sched.life.ready(ready_file)
        log.info("scheduler serving on %s (Redis %s, prefix %r, lease %.3g s, %d experts)",
                 sched.address, config.redis_url, config.key_prefix, config.node_ttl_s,
                 config.num_experts)
        await sched.life.wait(stop)
    finally:
        await sched.stop()
