"""The attention replica process: load attention weights, attach to expert nodes, run the engine,
serve ``megascale.v1.Attention`` (+ health, reflection) and Prometheus ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import grpc

import libm2n
from megascale.v1 import (
    attention_pb2,
    attention_pb2_grpc,
    common_pb2,
    expert_pb2,
    expert_pb2_grpc,
)
from services.attention.config import AttentionConfig
from services.attention.dispatch import ExpertClient
from services.attention.engine import Engine, TokenEvent
from services.attention.metrics import AttentionMetrics
from services.attention.pingpong import StepTimings
from services.attention.requests import (
    REQUEST_ID,
    REQUEST_ID_RULE,
    EventRelay,
    RequestMeter,
    StreamCall,
    arrival_from_unix_ns,
    event_to_proto,
    sampling_from_proto,
    start_span,
)
from services.attention.routing import ExpertNodeRoute, Placement
from services.attention.scheduler import QueueFull, StepPlan
from services.common import tracing
from services.common.grpcserver import start_server
from services.common.heap import freeze_startup_heap
from services.common.net import advertise_host, advertised_url
from services.common.readyfile import write_ready_file
from services.common.registration import NodeRegistration
from services.common.timeline import timeline_for
from services.core.model import AttentionSide
from services.core.runtime import configure_threads
from services.errors import ConfigError, UserError

log = logging.getLogger("megascale.attention")

ARRIVAL_KEY = "x-megascale-arrival-unix-ns"


class AttentionServicer(attention_pb2_grpc.AttentionServicer):
    """``megascale.v1.Attention`` (status codes are documented in attention.proto)."""

    def __init__(self, engine: Engine, metrics: AttentionMetrics, max_model_len: int,
                 loop: asyncio.AbstractEventLoop, attacher: ExpertAttacher) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.relay = EventRelay(loop)
        self.attacher = attacher

    async def Generate(self, request: attention_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext):  # noqa: ANN201 - async generator
        """Stream tokens; the last event carries finish_reason. Cancelling aborts the request."""
        if not REQUEST_ID.match(request.request_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, REQUEST_ID_RULE)
        metadata = context.invocation_metadata() or ()
        arrival = next((v for k, v in metadata if k == ARRIVAL_KEY), None)
        meter = RequestMeter(self.metrics, arrival_from_unix_ns(arrival),
                             start_span(request.request_id, len(request.prompt_token_ids),
                                        metadata))
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        try:
            params = sampling_from_proto(request.sampling, len(request.prompt_token_ids),
                                         self.max_model_len)
            self.engine.submit(request.request_id, list(request.prompt_token_ids), params,
                               lambda ev: self.relay.push(queue, ev),
                               list(request.output_token_ids),
                               tracing.span_ids(meter.span) if meter.span else None)
        except UserError as exc:
            meter.end("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            meter.end("resource_exhausted")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        reason = "cancelled"
        try:
            while True:
                ev = await queue.get()
                meter.observe(ev)
                yield event_to_proto(ev)
                if ev.finish_reason is not None:
                    reason = ev.finish_reason
                    return
        finally:
            if reason == "cancelled":  # the client went away or the deadline passed
                self.engine.abort(request.request_id)
            meter.end(reason)

    async def GenerateStream(self, request_iterator: AsyncIterator[
                                 attention_pb2.GenerateStreamRequest],
                             context: grpc.aio.ServicerContext):  # noqa: ANN201
        """Many requests over one call, one message per delivery burst (attention.proto;
        services/attention/requests.py)."""
        call = StreamCall(self.engine, self.metrics, self.relay, self.max_model_len)
        async for batch in call.run(request_iterator):
            yield batch

    async def Abort(self, request: attention_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> attention_pb2.AbortResponse:
        """Cancel a request; found=False when unknown or already finished."""
        return attention_pb2.AbortResponse(found=self.engine.abort(request.request_id))

    async def GetLoad(self, request: attention_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> common_pb2.LoadReport:
        """Running/waiting requests, KV usage, and mean step / T_a / expert wait times."""
        return self.metrics.load_report(self.engine)

    async def UpdatePlacement(self, request: common_pb2.ExpertPlacement,
                              context: grpc.aio.ServicerContext
                              ) -> common_pb2.UpdatePlacementResponse:
        """Adopt a newer placement at the next step boundary (older epochs are ignored),
        attaching first to expert nodes it names that this replica has not attached to.
        INVALID_ARGUMENT: malformed, or a new node cannot be attached."""
        try:
            applied = await adopt_placement(self.engine, request, self.attacher)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return common_pb2.UpdatePlacementResponse(applied_epoch=applied)


_LATE_ATTACH_S = 5.0  # an Attach made for a pushed placement (the RPC that pushed it waits)


async def adopt_placement(engine: Engine, p: common_pb2.ExpertPlacement,
                          attacher: ExpertAttacher) -> int:
    """Install a newer placement at the next step boundary; returns the epoch in force.

    Expert nodes the placement names that this replica is not attached to yet (nodes that
    joined later) are attached first, at the ``grpc_address`` the placement gives. Raises
    ValueError for a placement that is malformed or names a node that cannot be attached (the
    placement in force stays). Older epochs are ignored.
    """
    async with attacher.lock:
        return await _adopt_locked(engine, p, attacher)


async def _adopt_locked(engine: Engine, p: common_pb2.ExpertPlacement,
                        attacher: ExpertAttacher) -> int:
    current = engine.client.placement
    if p.epoch <= current.epoch:
        return current.epoch
    placement = placement_from_proto(p, current)
    known = engine.client.attached  # only read and written on the server's event loop
    down = set(engine.client.down)  # written by the engine thread: take a copy
    addresses = {h.node_id: h.grpc_address for rep in p.experts for h in rep.hosts}
    for node in placement.nodes:
        new = node.node_id not in known
        # A known node is attached again when it moved (a restart: new dispatch URL) or this
        # replica routes around it: a restarted node has no reply link to us until then.
        if not new and known[node.node_id] == node.dispatch_url and node.node_id not in down:
            continue
        try:
            resp = await _attach_node(attacher, p.epoch, node.node_id, addresses[node.node_id])
        except ValueError as exc:
            if new:  # a table naming a node we cannot reach is refused whole
                raise
            log.warning("re-attaching expert node %s failed (it stays routed around): %s",
                        node.node_id, exc)
            continue
        known[resp.node_id] = resp.dispatch_url
    engine.set_placement(placement)
    return p.epoch


async def _attach_node(attacher: ExpertAttacher, epoch: int, node_id: str, address: str
                       ) -> expert_pb2.AttachResponse:
    """``Expert.Attach`` at ``address``; ValueError when there is no address, the node cannot
    be reached, or it is not ``node_id``."""
    if not address:
        raise ValueError(f"placement epoch {epoch} names expert node {node_id}, which this "
                         "replica is not attached to, without its grpc_address")
    try:
        resp = await attacher.attach(address, timeout_s=_LATE_ATTACH_S)
    except ConfigError as exc:
        raise ValueError(f"placement epoch {epoch}: {exc}") from None
    if resp.node_id != node_id:
        raise ValueError(f"expert node at {address} is {resp.node_id!r}, the placement calls "
                         f"it {node_id!r}")
    return resp


async def _adopt_logged(engine: Engine, p: common_pb2.ExpertPlacement,
                        attacher: ExpertAttacher) -> None:
    try:
        await adopt_placement(engine, p, attacher)
    except ValueError as exc:
        log.warning("ignoring placement: %s", exc)


def placement_from_proto(p: common_pb2.ExpertPlacement, current: Placement) -> Placement:
    """Group the per-expert host lists into per-node routes."""
    if p.num_experts != current.num_experts:
        raise ValueError(f"placement has num_experts {p.num_experts}, the model has "
                         f"{current.num_experts}")
    nodes: dict[str, tuple[str, list[int]]] = {}
    for rep in p.experts:
        for host in rep.hosts:
            nodes.setdefault(host.node_id, (host.m2n_url, []))[1].append(rep.expert_id)
    routes = tuple(ExpertNodeRoute(nid, url, tuple(sorted(ids)))
                   for nid, (url, ids) in sorted(nodes.items()))
    return Placement(p.epoch, routes, p.num_experts)


class ExpertAttacher:
    """Calls ``Expert.Attach`` for this replica: the node opens its reply link to
    ``reply_url`` and reports what it hosts. At start for ``--expert-nodes``; later for nodes
    a pushed placement names (expert scale-out)."""

    def __init__(self, node_id: str, sender_id: int, reply_url: str, num_experts: int) -> None:
        self.node_id = node_id
        self.sender_id = sender_id
        self.reply_url = reply_url
        self.num_experts = num_experts
        # One adoption at a time: the scheduler's push and the registration's poll may
        # deliver the same placement together, and a node must be attached once.
        self.lock = asyncio.Lock()

    async def attach(self, address: str, timeout_s: float = 30.0) -> expert_pb2.AttachResponse:
        """Raises ConfigError (one line) when the node cannot be reached or serves another
        model."""
        async with grpc.aio.insecure_channel(address) as channel:
            stub = expert_pb2_grpc.ExpertStub(channel)
            try:
                resp = await stub.Attach(expert_pb2.AttachRequest(
                    node_id=self.node_id, m2n_sender_id=self.sender_id,
                    reply_url=self.reply_url), timeout=timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                raise ConfigError(f"cannot attach to expert node {address}: "
                                  f"{exc.code().name} {exc.details()}") from None
        if resp.num_experts != self.num_experts:
            raise ConfigError(f"expert node {address} serves a model with {resp.num_experts} "
                              f"experts, this replica's model has {self.num_experts}")
        return resp


async def attach_experts(config: AttentionConfig, attacher: ExpertAttacher) -> Placement:
    """Attach to every expert node; the placement is what they report hosting."""
    routes, epochs = [], set()
    for address in config.expert_nodes:
        resp = await attacher.attach(address)
        routes.append(ExpertNodeRoute(resp.node_id, resp.dispatch_url, tuple(resp.expert_ids)))
        epochs.add(resp.epoch)
    if len(epochs) != 1:
        raise ConfigError(f"expert nodes disagree on the placement epoch: {sorted(epochs)}")
    try:
        return Placement(epochs.pop(), tuple(routes), attacher.num_experts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def serve(config: AttentionConfig, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the replica until ``stop`` is set (or forever)."""
    import torch

    configure_threads(config.threads)
    tracing.setup_tracing("megascale-attention")
    attention = AttentionSide.from_pretrained(config.model_dir, getattr(torch, config.dtype),
                                              config.device)
    cfg = attention.cfg
    slots = max(4, 2 * config.micro_batches)
    reply_rx = libm2n.open_receiver(config.m2n_url, libm2n.ReceiverConfig(
        slots_per_sender=slots,
        slot_bytes=max(4096, config.scheduler.max_batch_tokens * cfg.hidden_size * 4)))
    host = advertise_host(config.host, config.advertise_host)
    reply_url = advertised_url(reply_rx.url, host)
    attacher = ExpertAttacher(config.node_id, config.m2n_sender_id, reply_url, cfg.num_experts)
    placement = await attach_experts(config, attacher)
    client = ExpertClient(placement, reply_rx, config.m2n_sender_id, cfg.hidden_size, cfg.top_k,
                          reply_timeout_s=config.expert_timeout_s,
                          peer_timeout_s=config.expert_timeout_s,
                          readmit_after_s=config.expert_readmit_s)
    metrics = AttentionMetrics()
    timeline = timeline_for(config.node_id)

    def on_step(plan: StepPlan, t: StepTimings) -> None:
        metrics.on_step(plan, t)
        if timeline is not None:
            timeline.write({"start": t.start, "wall": t.wall_s, "lane": t.lane,
                            "tokens": plan.num_tokens,
                            "intervals": [[k, layer, mb, t.start + a, t.start + b]
                                          for k, layer, mb, a, b in t.intervals]})

    engine = Engine(attention, client, config, on_step=on_step)
    engine.runner.record_intervals = timeline is not None
    metrics.watch(engine)
    stop_thread = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop_thread,), name="engine", daemon=True)
    thread.start()
    servicer = AttentionServicer(engine, metrics, engine.scheduler.config.max_model_len,
                                 asyncio.get_running_loop(), attacher)
    server, port, _health = await start_server(
        config.host, config.grpc_port,
        lambda s: attention_pb2_grpc.add_AttentionServicer_to_server(servicer, s),
        [attention_pb2.DESCRIPTOR.services_by_name["Attention"].full_name])
    metrics_port = metrics.serve(config.host, config.metrics_port)
    freeze_startup_heap()
    write_ready_file(ready_file, {"role": "attention", "node_id": config.node_id,
                                  "grpc": f"{host}:{port}", "m2n_url": reply_url,
                                  "metrics_port": metrics_port,
                                  "num_blocks": config.num_blocks})
    log.info("attention replica %s serving on %s:%d, %d expert node(s), m=%d", config.node_id,
             host, port, len(placement.nodes), config.micro_batches)
    registration = None
    if config.scheduler_addr:
        registration = NodeRegistration(config.scheduler_addr, common_pb2.NodeInfo(
            node_id=config.node_id, role=common_pb2.NODE_ROLE_ATTENTION,
            grpc_address=f"{host}:{port}", m2n_url=reply_url,
            model=config.model_dir.name, kv_blocks=config.num_blocks,
            kv_block_size=config.block_size,
            max_running_requests=config.scheduler.max_num_seqs, started_at_unix_s=time.time()),
            load_fn=lambda: metrics.load_report(engine),
            on_placement=lambda p: _adopt_logged(engine, p, attacher))
        await registration.start()
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        if registration is not None:
            await registration.stop()
        await server.stop(grace=1.0)
        stop_thread.set()
        thread.join(timeout=10)
        client.close()
        reply_rx.close()
        tracing.shutdown_tracing()
