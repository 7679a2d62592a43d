"""``megascale serve gateway``: flags -> :class:`GatewayConfig` -> :func:`serve`.

The gateway runs uvicorn (the OpenAI REST app) and the ``megascale.v1.Gateway`` gRPC server in
one event loop, and writes its ready file once both listen::

    {"role": "gateway", "node_id": ..., "http": "http://HOST:PORT", "grpc": "HOST:PORT",
     "model": SERVED_NAME, "metrics_port": ..., "pid": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from megascale.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import tracing
from services.common.flags import add_flag, add_server_flags
from services.common.grpcserver import start_server
from services.common.heap import freeze_startup_heap
from services.common.metrics import serve_metrics
from services.common.readyfile import write_ready_file
from services.gateway.backend import Backend, SchedulerPicker, StaticPicker
from services.gateway.config import GatewayConfig
from services.gateway.generation import Pipeline
from services.gateway.metrics import GatewayMetrics
from services.gateway.text import ModelText

__all__ = ["add_arguments", "build", "serve"]

log = logging.getLogger("megascale.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p)
    add_flag(p, "--model", required=True, help="checkpoint directory (tokenizer + config.json)")
    add_flag(p, "--served-model-name", default=None,
             help="model id clients send (default: the model directory's name)")
    add_flag(p, "--port", type=int, default=0, help="HTTP port (0 = pick a free one)")
    add_flag(p, "--attention", default=None,
             help="comma list of attention replicas' gRPC addresses (static routing)")
    add_flag(p, "--scheduler", default=None,
             help="scheduler gRPC address: ask it PickReplica for every request")
    add_flag(p, "--api-key", default=None,
             help="require 'Authorization: Bearer KEY' (env MEGASCALE_API_KEY)")
    add_flag(p, "--max-body-bytes", type=int, default=4 << 20,
             help="largest request body accepted (413 beyond)")
    add_flag(p, "--max-model-len", type=int, default=0,
             help="context length (prompt + output); 0 = the checkpoint's")
    add_flag(p, "--request-timeout", type=float, default=600.0,
             help="seconds a request may run downstream")
    add_flag(p, "--max-attempts", type=int, default=3,
             help="replicas tried per request (failover before streaming, resume after)")


def build(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        model_dir=args.model, served_model_name=args.served_model_name or "",
        host=args.host, http_port=args.port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, node_id=args.node_id or f"gateway-{os.getpid()}",
        attention=tuple(a.strip() for a in (args.attention or "").split(",") if a.strip()),
        scheduler=args.scheduler or None, api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len,
        request_timeout_s=args.request_timeout, max_attempts=args.max_attempts)


async def serve(config: GatewayConfig, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve REST + gRPC until ``stop`` is set (or forever)."""
    import uvicorn

    from services.gateway.app import create_app
    from services.gateway.grpc_frontdoor import GatewayServicer

    tracing.setup_tracing("megascale-gateway")
    text = ModelText(config.model_dir, config.served_model_name, config.max_model_len)
    metrics = GatewayMetrics()
    picker = (SchedulerPicker(config.scheduler, config.served_model_name) if config.scheduler
              else StaticPicker(config.attention))
    backend = Backend(picker, metrics, config.request_timeout_s, config.max_attempts)
    pipeline = Pipeline(text, backend, metrics)
    app = create_app(text, pipeline, metrics, config.api_key, config.max_body_bytes)
    servicer = GatewayServicer(text, pipeline, config.api_key)
    grpc_server, grpc_port, _health = await start_server(
        config.host, config.grpc_port,
        lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
        [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name])
    metrics_port = serve_metrics(metrics.registry, config.host, config.metrics_port)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.http_port,
                                           log_level="warning", access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=2))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign] # the CLI owns
    http_task = asyncio.create_task(server.serve())
    while not server.started:
        if http_task.done():  # failed to bind: surface the error
            await http_task
            raise RuntimeError("the HTTP server stopped before it started")
        await asyncio.sleep(0.02)
    http_port = server.servers[0].sockets[0].getsockname()[1]
    freeze_startup_heap()
    write_ready_file(ready_file, {
        "role": "gateway", "node_id": config.node_id, "model": config.served_model_name,
        "http": f"http://{config.host}:{http_port}", "grpc": f"{config.host}:{grpc_port}",
        "metrics_port": metrics_port})
    log.info("gateway %s serving %s: http://%s:%d, gRPC %s:%d, replicas %s", config.node_id,
             config.served_model_name, config.host, http_port, config.host, grpc_port,
             config.scheduler and f"via scheduler {config.scheduler}" or ",".join(
                 config.attention))
    stop = stop or asyncio.Event()
    try:
        await asyncio.wait({http_task, asyncio.ensure_future(stop.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        await grpc_server.stop(grace=1.0)
        await asyncio.gather(http_task, return_exceptions=True)
        await backend.close()
        tracing.shutdown_tracing()
