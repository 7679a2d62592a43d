"""``megascale serve gateway``: flags -> :class:`GatewayConfig` -> :func:`serve`."""

from __future__ import annotations

import argparse
import os

from services.common.flags import add_flag, add_server_flags, secret_from
from services.gateway.config import GatewayConfig
from services.gateway.server import serve

__all__ = ["add_arguments", "build", "serve"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p)
    add_flag(p, "--model", required=True, help="checkpoint directory (tokenizer + config.json)")
    add_flag(p, "--served-model-name", default=None,
             help="model id clients send (default: the model directory's name)")
    add_flag(p, "--port", type=int, default=0, help="HTTP port (0 = pick a free one)")
    add_flag(p, "--attention", default=None,
             help="comma list of attention replicas' gRPC addresses: the replicas to use, or "
                  "with --scheduler the ones to fall back on while it cannot be reached")
    add_flag(p, "--scheduler", default=None,
             help="scheduler gRPC address: ask it PickReplica for every request")
    add_flag(p, "--api-key", default=None,
             help="require 'Authorization: Bearer KEY'; better given as MEGASCALE_API_KEY "
                  "or --api-key-file (argv is visible in ps)")
    add_flag(p, "--api-key-file", default=None, help="file holding the API key")
    add_flag(p, "--max-body-bytes", type=int, default=4 << 20,
             help="largest request body accepted (413 beyond)")
    add_flag(p, "--max-model-len", type=int, default=0,
             help="context length (prompt + output); 0 = the checkpoint's")
    add_flag(p, "--request-timeout", type=float, default=600.0,
             help="seconds a request may run downstream")
    add_flag(p, "--max-attempts", type=int, default=3,
             help="replicas tried per request (failover before streaming, resume after)")
    add_flag(p, "--tool-call-parser", default="hermes",
             help="how tool calls are found in generated text with tool_choice \"auto\": "
                  "hermes (<tool_call>{...}</tool_call>) or none (auto refused)")
    add_flag(p, "--allowed-origins", default="",
             help="CORS: comma list of browser origins allowed to call the API (* = any); "
                  "empty = no CORS headers")


def build(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        model_dir=args.model, served_model_name=args.served_model_name or "",
        host=args.host, http_port=args.port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, node_id=args.node_id or f"gateway-{os.getpid()}",
        attention=tuple(a.strip() for a in (args.attention or "").split(",") if a.strip()),
        scheduler=args.scheduler or None,
        api_key=secret_from(args.api_key, args.api_key_file, "--api-key"),
        max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len,
        request_timeout_s=args.request_timeout, max_attempts=args.max_attempts,
        tool_call_parser=args.tool_call_parser,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()))
