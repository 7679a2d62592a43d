"""The attention replica process: load attention weights, attach to expert nodes, run the engine,
serve ``megascale.v1.Attention`` (+ health, reflection) and Prometheus ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc

import libm2n
from megascale.v1 import attention_pb2, attention_pb2_grpc, common_pb2
from services.attention.batching import QueueFull, StepPlan
from services.attention.config import AttentionConfig
from services.attention.dispatch import ExpertClient
from services.attention.engine import Engine, TokenEvent
from services.attention.local_experts import LocalExperts
from services.attention.metrics import AttentionMetrics
from services.attention.pingpong import StepTimings
from services.attention.placement import (
    ExpertAttacher,
    adopt_logged,
    adopt_placement,
    attach_experts,
    placement_from_scheduler,
)
from services.attention.requests import (
    EventRelay,
    RequestMeter,
    StreamCall,
    abort_reason,
    admit,
    arrival_from_unix_ns,
    event_to_proto,
    start_span,
)
from services.common import auth
from services.common.epochs import check_pushed_epoch
from services.common.lifecycle import RoleLifecycle
from services.common.net import advertised_url
from services.common.timeline import timeline_for
from services.core import moe_wire
from services.core.config import ModelConfig
from services.core.kv_cache import PagedKVCache
from services.core.model import AttentionSide, ExpertSide
from services.core.request import model_id
from services.core.runtime import configure_threads, gpu_memory_budget
from services.errors import ConfigError, UserError

log = logging.getLogger("megascale.attention")

ARRIVAL_KEY = "x-megascale-arrival-unix-ns"


class AttentionServicer(attention_pb2_grpc.AttentionServicer):
    """``megascale.v1.Attention`` (status codes are documented in attention.proto)."""

    def __init__(self, engine: Engine, metrics: AttentionMetrics,
                 loop: asyncio.AbstractEventLoop, attacher: ExpertAttacher | None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.relay = EventRelay(loop)
        self.attacher = attacher

    async def Generate(self, request: attention_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext):  # noqa: ANN201 - async generator
        """Stream tokens; the last event carries finish_reason. Cancelling aborts the request."""
        metadata = context.invocation_metadata() or ()
        arrival = next((v for k, v in metadata if k == ARRIVAL_KEY), None)
        meter = RequestMeter(self.metrics, arrival_from_unix_ns(arrival),
                             start_span(request.request_id, len(request.prompt_token_ids),
                                        metadata))
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        try:
            admit(self.engine, request, lambda ev: self.relay.push(queue, ev), meter)
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
        call = StreamCall(self.engine, self.metrics, self.relay)
        async for batch in call.run(request_iterator):
            yield batch

    async def Abort(self, request: attention_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> attention_pb2.AbortResponse:
        """Cancel a request; found=False when unknown or already finished."""
        return attention_pb2.AbortResponse(found=self.engine.abort(request.request_id,
                                                                   abort_reason(request)))

    async def GetLoad(self, request: attention_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> common_pb2.LoadReport:
        """Running/waiting requests, KV usage, and mean step / T_a / expert wait times."""
        return self.metrics.load_report(self.engine)

    async def UpdatePlacement(self, request: common_pb2.ExpertPlacement,
                              context: grpc.aio.ServicerContext
                              ) -> common_pb2.UpdatePlacementResponse:
        """Adopt a newer placement at the next step boundary (older epochs are ignored),
        attaching first to expert nodes it names that this replica has not attached to.
        INVALID_ARGUMENT: malformed, a jump past the epoch bound (services/common/epochs.py),
        or a new node cannot be attached."""
        try:
            check_pushed_epoch(self.engine.placement.epoch, request.epoch)
            applied = await adopt_placement(self.engine, request, self.attacher)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return common_pb2.UpdatePlacementResponse(applied_epoch=applied)


CPU_NUM_BLOCKS = 512


def kv_blocks(config: AttentionConfig, attention: AttentionSide) -> int:
    """The KV pool size: ``config.num_blocks`` when given; on CUDA what the memory budget
    holds after the weights (ConfigError naming the flags when that is not one full-length
    request); on CPU :data:`CPU_NUM_BLOCKS`."""
    if config.num_blocks is not None:
        return config.num_blocks
    if attention.device.type != "cuda":
        return CPU_NUM_BLOCKS
    cfg, b = attention.cfg, config.batching
    # Activations of one step: hidden-sized intermediates and float32 logits per token.
    reserve = b.max_batch_tokens * (cfg.vocab_size + 16 * cfg.hidden_size) * 4
    budget = gpu_memory_budget(attention.device, config.gpu_memory_utilization, reserve)
    blocks = PagedKVCache.blocks_for_memory(cfg, config.block_size, attention.dtype, budget)
    need = -(-min(b.max_model_len, cfg.max_position_embeddings) // config.block_size)
    if blocks < need:
        raise ConfigError(f"--gpu-memory-utilization {config.gpu_memory_utilization} leaves "
                          f"room for {blocks} KV blocks of {config.block_size} tokens, fewer "
                          f"than one {b.max_model_len}-token request needs ({need}): raise it, "
                          "lower --max-model-len, or set --num-blocks")
    return blocks


def _local_client(config: AttentionConfig, cfg: ModelConfig, attention: AttentionSide
                  ) -> tuple[LocalExperts, ExpertAttacher | None, str]:
    """Colocated mode: every expert loaded here (services/attention/local_experts.py)."""
    experts = ExpertSide.from_pretrained(config.model_dir, None, attention.dtype,
                                         attention.device, cfg)
    return LocalExperts(experts), None, ""


async def _remote_client(config: AttentionConfig, cfg: ModelConfig, attention: AttentionSide,
                         life: RoleLifecycle) -> tuple[ExpertClient, ExpertAttacher, str]:
    """Disaggregated mode: the combine receiver, attached expert nodes, their dispatch links."""
    reply_rx = libm2n.open_receiver(config.m2n_url, libm2n.ReceiverConfig(
        slots_per_sender=max(4, 2 * config.micro_batches), auth_token=auth.m2n_token(),
        slot_bytes=max(4096, moe_wire.combine_bytes(config.batching.max_batch_tokens,
                                                    cfg.hidden_size, attention.dtype))))
    life.defer(reply_rx.close)
    reply_url = advertised_url(reply_rx.url, life.advertised)
    attacher = ExpertAttacher(config.node_id, config.m2n_sender_id, reply_url, cfg.num_experts)
    if config.expert_nodes:
        placement = await attach_experts(config, attacher)
    else:  # an elastic pool: the nodes come from the scheduler's placement
        placement, _ = await placement_from_scheduler(config, attacher)
    client = ExpertClient(placement, reply_rx, config.m2n_sender_id, cfg.hidden_size,
                          cfg.top_k, reply_timeout_s=config.expert_timeout_s,
                          peer_timeout_s=config.expert_timeout_s,
                          readmit_after_s=config.expert_readmit_s,
                          dtype=attention.dtype, device=attention.device,
                          auth_token=auth.m2n_token(), reply_senders=attacher.reply_senders)
    return client, attacher, reply_url


async def serve(config: AttentionConfig, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the replica until ``stop`` is set (or forever)."""
    import torch

    configure_threads(config.threads, config.device, config.dtype)
    async with RoleLifecycle("attention", config.node_id, config.host,
                             config.advertise_host) as life:
        attention = AttentionSide.from_pretrained(config.model_dir,
                                                  getattr(torch, config.dtype), config.device)
        cfg = attention.cfg
        config = dataclasses.replace(config, num_blocks=kv_blocks(config, attention))
        if config.local_experts:
            client, attacher, reply_url = _local_client(config, cfg, attention)
        else:
            client, attacher, reply_url = await _remote_client(config, cfg, attention, life)
        life.defer(client.close)
        metrics = AttentionMetrics(config.served_model_name or model_id(config.model_dir))
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
        life.start_thread(engine.run, "engine", join_s=10)
        servicer = AttentionServicer(engine, metrics, asyncio.get_running_loop(), attacher)
        await life.start_grpc(
            config.grpc_port,
            lambda s: attention_pb2_grpc.add_AttentionServicer_to_server(servicer, s),
            [attention_pb2.DESCRIPTOR.services_by_name["Attention"].full_name])
        life.serve_metrics(metrics.registry, config.metrics_port)
        await life.ready(
            ready_file, {"m2n_url": reply_url, "num_blocks": config.num_blocks,
                         "device": str(attention.device), "dtype": config.dtype},
            config.scheduler, common_pb2.NodeInfo(
                role=common_pb2.NODE_ROLE_ATTENTION, m2n_url=reply_url,
                model=model_id(config.model_dir), kv_blocks=config.num_blocks,
                kv_block_size=config.block_size,
                max_running_requests=config.batching.max_num_seqs),
            load_fn=lambda: metrics.load_report(engine),
            on_placement=lambda p: adopt_logged(engine, p, attacher))
        log.info("attention replica %s serving on %s, %s, m=%d", config.node_id,
                 life.grpc_address, "experts in-process (colocated)" if config.local_experts
                 else f"{len(client.placement.nodes)} expert node(s)", config.micro_batches)
        await life.wait(stop)
