"""The expert node process: load its experts, run the drain loop, serve the Expert gRPC API.

One process = one libm2n dispatch receiver + one compute thread (:mod:`services.expert.worker`)
+ a grpc.aio server (``megascale.v1.Expert``, health, reflection) + Prometheus ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import libm2n
from megascale.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from services.common import tracing
from services.common.grpcserver import start_server
from services.common.heap import freeze_startup_heap
from services.common.metrics import LATENCY_BUCKETS, new_registry, serve_metrics
from services.common.net import advertise_host, advertised_url
from services.common.readyfile import write_ready_file
from services.common.registration import NodeRegistration
from services.common.timeline import timeline_for
from services.core.config import ModelConfig
from services.core.model import ExpertSide
from services.core.runtime import configure_threads
from services.errors import ConfigError
from services.expert.config import ExpertConfig
from services.expert.worker import ComputeEvent, ExpertWorker

log = logging.getLogger("megascale.expert")

class ExpertMetrics:
    """The node's Prometheus metrics (DESIGN.md §7 names)."""

    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.tokens = Counter("megascale:expert_tokens", "Token rows computed per expert "
                              "(all layers)", ["expert"], registry=r)
        self.rows = Histogram("megascale:expert_batch_rows", "Rows per expert compute call "
                              "(one layer, all senders)", buckets=(1, 2, 4, 8, 16, 32, 64, 128,
                                                                   256, 512, 1024, 4096),
                              registry=r)
        self.compute = Histogram("megascale:expert_compute_seconds", "T_e: one layer's expert "
                                 "compute over the drained rows", buckets=LATENCY_BUCKETS,
                                 registry=r)

    def watch(self, worker: ExpertWorker) -> None:
        """Export the worker's counters, read at scrape time (no copying on the hot path)."""
        self.registry.register(_WorkerCollector(worker))

    def on_compute(self, ev: ComputeEvent) -> None:
        for e, c in zip(ev.experts, ev.rows_per_expert, strict=True):
            self.tokens.labels(expert=str(e)).inc(c)
        self.rows.observe(ev.rows)
        self.compute.observe(ev.seconds)


class _WorkerCollector(Collector):
    def __init__(self, worker: ExpertWorker) -> None:
        self.worker = worker

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        s = self.worker.stats
        yield CounterMetricFamily("megascale:expert_messages", "Dispatch messages received",
                                  value=s.messages)
        yield CounterMetricFamily("megascale:expert_refused_messages",
                                  "Dispatches answered with an error", value=s.refused)
        up = time.monotonic() - s.started
        yield GaugeMetricFamily("megascale:expert_idle_fraction",
                                "Fraction of uptime not computing",
                                value=max(0.0, 1.0 - s.compute_s / up) if up > 0 else 1.0)


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    """``megascale.v1.Expert``: control only; token rows travel over libm2n."""

    def __init__(self, config: ExpertConfig, cfg: ModelConfig, worker: ExpertWorker,
                 dispatch_url: str) -> None:
        self.config = config
        self.cfg = cfg
        self.worker = worker
        self.dispatch_url = dispatch_url

    async def Attach(self, request: expert_pb2.AttachRequest, context: grpc.aio.ServicerContext
                     ) -> expert_pb2.AttachResponse:
        """Open the combine link to ``request.reply_url``; reply with the dispatch URL."""
        try:
            libm2n.parse_url(request.reply_url)
        except libm2n.InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            await asyncio.to_thread(self.worker.attach, request.m2n_sender_id,
                                    request.reply_url)
        except libm2n.M2NError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"cannot open reply link to {request.reply_url}: {exc}")
        log.info("attached %s (m2n sender %d) -> %s", request.node_id, request.m2n_sender_id,
                 request.reply_url)
        return expert_pb2.AttachResponse(
            node_id=self.config.node_id, dispatch_url=self.dispatch_url,
            expert_ids=list(self.config.expert_ids), num_experts=self.cfg.num_experts,
            epoch=self.worker.epoch, m2n_sender_id=self.config.m2n_sender_id)

    async def GetStats(self, request: expert_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> expert_pb2.ExpertStats:
        """Counters since start: rows per expert, messages, refused frames, mean group rows."""
        s = self.worker.stats
        rx = self.worker.rx.stats()
        return expert_pb2.ExpertStats(
            node_id=self.config.node_id, expert_ids=list(self.config.expert_ids),
            rows_by_expert={int(k): int(v) for k, v in s.rows_by_expert.items()},
            messages_received=s.messages, bad_frames=int(rx.get("errors", 0)) + s.refused,
            mean_group_rows=(s.group_rows / s.groups) if s.groups else 0.0)

    async def UpdatePlacement(self, request: common_pb2.ExpertPlacement,
                              context: grpc.aio.ServicerContext
                              ) -> common_pb2.UpdatePlacementResponse:
        """Adopt a newer placement epoch (older ones are ignored)."""
        if request.num_experts and request.num_experts != self.cfg.num_experts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"placement has num_experts {request.num_experts}, the model "
                                f"has {self.cfg.num_experts}")
        if request.epoch > self.worker.epoch:
            self.worker.set_epoch(request.epoch)
        return common_pb2.UpdatePlacementResponse(applied_epoch=self.worker.epoch)

    async def Drain(self, request: expert_pb2.DrainRequest, context: grpc.aio.ServicerContext
                    ) -> expert_pb2.DrainResponse:
        """Wait up to ``timeout_ms`` for in-flight messages to be answered."""
        deadline = time.monotonic() + request.timeout_ms / 1000
        while self.worker.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        pending = self.worker.inflight
        return expert_pb2.DrainResponse(drained=pending == 0, pending_messages=pending)


def load_experts(config: ExpertConfig) -> tuple[ModelConfig, ExpertSide]:
    import torch

    cfg = ModelConfig.from_pretrained(config.model_dir)
    bad = [e for e in config.expert_ids if e >= cfg.num_experts]
    if bad:
        raise ConfigError(f"expert_ids {bad} are out of range: the model has "
                          f"{cfg.num_experts} experts")
    side = ExpertSide.from_pretrained(config.model_dir, config.expert_ids,
                                      getattr(torch, config.dtype), config.device, cfg)
    return cfg, side


async def serve(config: ExpertConfig, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the node until ``stop`` is set (or forever)."""
    configure_threads(config.threads)
    tracing.setup_tracing("megascale-expert")
    cfg, experts = load_experts(config)
    # which grouped GEMM serves the experts (services/core/cpu_gemm.py), for the ready file/log
    gemm = "packed" if experts.packed else "torch"
    metrics = ExpertMetrics()
    rx = libm2n.open_receiver(config.m2n_url, libm2n.ReceiverConfig(
        slots_per_sender=config.slots_per_sender, slot_bytes=config.slot_bytes))
    timeline = timeline_for(config.node_id)

    def on_compute(ev: ComputeEvent) -> None:
        metrics.on_compute(ev)
        if timeline is not None:
            timeline.write({"start": ev.start, "end": ev.start + ev.seconds, "rows": ev.rows,
                            "layer": ev.layer})

    worker = ExpertWorker(experts, rx, config.m2n_sender_id, config.epoch, on_compute=on_compute)
    metrics.watch(worker)
    stop_thread = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop_thread,), name="expert-drain",
                              daemon=True)
    thread.start()
    host = advertise_host(config.host, config.advertise_host)
    m2n_url = advertised_url(rx.url, host)
    servicer = ExpertServicer(config, cfg, worker, m2n_url)
    server, port, _health = await start_server(
        config.host, config.grpc_port,
        lambda s: expert_pb2_grpc.add_ExpertServicer_to_server(servicer, s),
        [expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name])
    metrics_port = serve_metrics(metrics.registry, config.host, config.metrics_port)
    freeze_startup_heap()
    write_ready_file(ready_file, {"role": "expert", "node_id": config.node_id,
                                  "grpc": f"{host}:{port}", "m2n_url": m2n_url,
                                  "metrics_port": metrics_port,
                                  "expert_ids": list(config.expert_ids),
                                  "expert_gemm": gemm})
    log.info("expert node %s serving experts %s on %s:%d (m2n %s, expert GEMM %s)",
             config.node_id, list(config.expert_ids), host, port, m2n_url, gemm)
    registration = None
    if config.scheduler:
        registration = NodeRegistration(config.scheduler, common_pb2.NodeInfo(
            node_id=config.node_id, role=common_pb2.NODE_ROLE_EXPERT,
            grpc_address=f"{host}:{port}", m2n_url=m2n_url,
            model=config.model_dir.name, expert_ids=list(config.expert_ids),
            started_at_unix_s=time.time()),
            on_placement=lambda p: worker.set_epoch(max(worker.epoch, p.epoch)))
        await registration.start()
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        if registration is not None:
            await registration.stop()
        await server.stop(grace=1.0)
        stop_thread.set()
        thread.join(timeout=5)
        worker.close()
        rx.close()
        tracing.shutdown_tracing()
