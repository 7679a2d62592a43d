"""The expert node process: load its experts, run the drain loop, serve the Expert gRPC API.

One process = one libm2n dispatch receiver + one compute thread (:mod:`services.expert.worker`)
+ a grpc.aio server (``megascale.v1.Expert``, health, reflection) + Prometheus ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc

import libm2n
from megascale.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from services.common import auth
from services.common.epochs import check_pushed_epoch
from services.common.lifecycle import RoleLifecycle
from services.common.net import advertised_url
from services.common.timeline import timeline_for
from services.core import moe_wire
from services.core.config import ModelConfig
from services.core.model import ExpertSide
from services.core.request import model_id
from services.core.runtime import configure_threads
from services.errors import ConfigError
from services.expert.config import ExpertConfig
from services.expert.metrics import ExpertMetrics
from services.expert.worker import ComputeEvent, ExpertWorker, SenderIdTaken

log = logging.getLogger("megascale.expert")

class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    """``megascale.v1.Expert``: control only; token rows travel over libm2n."""

    def __init__(self, config: ExpertConfig, cfg: ModelConfig, worker: ExpertWorker,
                 dispatch_url: str) -> None:
        self.config = config
        self.cfg = cfg
        self.worker = worker
        self.dispatch_url = dispatch_url
        self._load_lock = asyncio.Lock()  # one LoadExperts at a time
        self._requested: tuple[int, ...] = ()  # what the last LoadExperts asked for

    async def Attach(self, request: expert_pb2.AttachRequest, context: grpc.aio.ServicerContext
                     ) -> expert_pb2.AttachResponse:
        """Open the combine link to ``request.reply_url``; reply with the dispatch URL.
        PERMISSION_DENIED when the caller's credential names another node; ALREADY_EXISTS when
        the sender id has a live link to another replica."""
        who = auth.caller()
        if who is not None and who.node_id is not None and who.node_id != request.node_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the credential of node {who.node_id!r} may not attach as "
                                f"{request.node_id!r}")
        try:
            libm2n.parse_url(request.reply_url)
        except libm2n.InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            await asyncio.to_thread(self.worker.attach, request.m2n_sender_id,
                                    request.reply_url)
        except SenderIdTaken as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except libm2n.M2NError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"cannot open reply link to {request.reply_url}: {exc}")
        log.info("attached %s (m2n sender %d) -> %s", request.node_id, request.m2n_sender_id,
                 request.reply_url)
        return expert_pb2.AttachResponse(
            node_id=self.config.node_id, dispatch_url=self.dispatch_url,
            expert_ids=sorted(self.worker.hosted), num_experts=self.cfg.num_experts,
            epoch=self.worker.epoch, m2n_sender_id=self.config.m2n_sender_id)

    async def GetStats(self, request: expert_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> expert_pb2.ExpertStats:
        """Counters since start: rows per expert, messages, refused frames, mean group rows."""
        s = self.worker.stats
        rx = self.worker.rx.stats()
        return expert_pb2.ExpertStats(
            node_id=self.config.node_id, expert_ids=sorted(self.worker.hosted),
            rows_by_expert={int(k): int(v) for k, v in s.rows_by_expert.items()},
            messages_received=s.messages, bad_frames=int(rx.get("errors", 0)) + s.refused,
            mean_group_rows=(s.group_rows / s.groups) if s.groups else 0.0)

    async def UpdatePlacement(self, request: common_pb2.ExpertPlacement,
                              context: grpc.aio.ServicerContext
                              ) -> common_pb2.UpdatePlacementResponse:
        """Adopt a newer placement epoch (older ones are ignored; a jump past the bound of
        services/common/epochs.py is INVALID_ARGUMENT)."""
        if request.num_experts and request.num_experts != self.cfg.num_experts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"placement has num_experts {request.num_experts}, the model "
                                f"has {self.cfg.num_experts}")
        try:
            check_pushed_epoch(self.worker.epoch, request.epoch)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.epoch > self.worker.epoch:
            self.worker.set_epoch(request.epoch)
        return common_pb2.UpdatePlacementResponse(applied_epoch=self.worker.epoch)

    async def LoadExperts(self, request: expert_pb2.LoadExpertsRequest,
                          context: grpc.aio.ServicerContext) -> expert_pb2.LoadExpertsResponse:
        """Serve ``request.expert_ids`` (an elastic node; expert.proto): the previous
        request's experts are kept until the next call, since replicas route by the old
        placement until they switch to the one naming the new set."""
        if not self.config.elastic:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"expert node {self.config.node_id} hosts fixed experts "
                                f"{list(self.config.expert_ids)} (not --experts auto)")
        ids = tuple(sorted(set(request.expert_ids)))
        bad = [e for e in ids if e >= self.cfg.num_experts]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"expert_ids {bad} are out of range: the model has "
                                f"{self.cfg.num_experts} experts")
        async with self._load_lock:
            keep = sorted(set(ids) | set(self._requested))
            t0 = time.perf_counter()
            if set(keep) != self.worker.hosted:
                side = await asyncio.to_thread(load_expert_side, self.config, self.cfg, keep)
                self.worker.set_experts(side)
                log.info("now serving experts %s (loaded in %.2f s)", keep,
                         time.perf_counter() - t0)
            self._requested = ids
            return expert_pb2.LoadExpertsResponse(expert_ids=sorted(self.worker.hosted),
                                                  load_seconds=time.perf_counter() - t0)

    async def Drain(self, request: expert_pb2.DrainRequest, context: grpc.aio.ServicerContext
                    ) -> expert_pb2.DrainResponse:
        """Wait up to ``timeout_ms`` for in-flight messages to be answered."""
        deadline = time.monotonic() + request.timeout_ms / 1000
        while self.worker.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        pending = self.worker.inflight
        return expert_pb2.DrainResponse(drained=pending == 0, pending_messages=pending)


def load_experts(config: ExpertConfig) -> tuple[ModelConfig, ExpertSide]:
    cfg = ModelConfig.from_pretrained(config.model_dir)
    bad = [e for e in config.expert_ids if e >= cfg.num_experts]
    if bad:
        raise ConfigError(f"expert_ids {bad} are out of range: the model has "
                          f"{cfg.num_experts} experts")
    return cfg, load_expert_side(config, cfg, config.expert_ids)


def load_expert_side(config: ExpertConfig, cfg: ModelConfig, expert_ids: Sequence[int]
                     ) -> ExpertSide:
    """The weights of ``expert_ids`` (every sparse layer) from the checkpoint."""
    import torch

    return ExpertSide.from_pretrained(config.model_dir, expert_ids,
                                      getattr(torch, config.dtype), config.device, cfg)


async def serve(config: ExpertConfig, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the node until ``stop`` is set (or forever)."""
    configure_threads(config.threads, config.device, config.dtype)
    async with RoleLifecycle("expert", config.node_id, config.host,
                             config.advertise_host) as life:
        cfg, experts = load_experts(config)
        # which grouped GEMM serves the experts (services/core/cpu_gemm.py), for ready file/log
        gemm = "packed" if experts.packed else "torch"
        metrics = ExpertMetrics()
        slot_bytes = config.slot_bytes or max(4096, moe_wire.dispatch_bytes(
            config.max_batch_tokens, cfg.hidden_size, cfg.top_k, experts.dtype))
        rx = libm2n.open_receiver(config.m2n_url, libm2n.ReceiverConfig(
            slots_per_sender=config.slots_per_sender, slot_bytes=slot_bytes,
            auth_token=auth.m2n_token(),
            max_slot_memory_bytes=config.max_attention_replicas * config.slots_per_sender
            * slot_bytes))
        life.defer(rx.close)
        timeline = timeline_for(config.node_id)

        def on_compute(ev: ComputeEvent) -> None:
            metrics.on_compute(ev)
            if timeline is not None:
                timeline.write({"start": ev.start, "end": ev.start + ev.seconds,
                                "rows": ev.rows, "layer": ev.layer})

        worker = ExpertWorker(experts, rx, config.m2n_sender_id, config.epoch,
                              on_compute=on_compute, auth_token=auth.m2n_token())
        life.defer(worker.close)
        metrics.watch(worker)
        life.start_thread(worker.run, "expert-drain", join_s=5)
        m2n_url = advertised_url(rx.url, life.advertised)
        servicer = ExpertServicer(config, cfg, worker, m2n_url)
        await life.start_grpc(
            config.grpc_port,
            lambda s: expert_pb2_grpc.add_ExpertServicer_to_server(servicer, s),
            [expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name])
        life.serve_metrics(metrics.registry, config.metrics_port)
        await life.ready(
            ready_file, {"m2n_url": m2n_url, "expert_ids": list(config.expert_ids),
                         "expert_gemm": gemm, "device": str(experts.device),
                         "dtype": config.dtype},
            config.scheduler, common_pb2.NodeInfo(
                role=common_pb2.NODE_ROLE_EXPERT, m2n_url=m2n_url,
                model=model_id(config.model_dir), expert_ids=list(config.expert_ids),
                elastic=config.elastic),
            on_placement=lambda p: worker.set_epoch(max(worker.epoch, p.epoch)))
        log.info("expert node %s serving experts %s on %s (m2n %s, expert GEMM %s)",
                 config.node_id, "auto" if config.elastic else list(config.expert_ids),
                 life.grpc_address, m2n_url, gemm)
        await life.wait(stop)
