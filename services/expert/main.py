"""``megascale serve expert``: flags -> :class:`ExpertConfig` -> :func:`serve`."""

from __future__ import annotations

import argparse
import os

from services.common.flags import add_compute_flags, add_flag, add_server_flags, threads_from
from services.core.runtime import pick_device
from services.expert.config import ExpertConfig, parse_expert_ids
from services.expert.server import serve

__all__ = ["add_arguments", "build", "serve"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p)
    add_compute_flags(p)
    add_flag(p, "--experts", required=True, help="expert ids hosted, e.g. 0,1,4-7")
    add_flag(p, "--m2n-sender-id", type=int, default=1 << 16,
             help="this node's id on its reply links")
    add_flag(p, "--slot-bytes", type=int, default=4 << 20,
             help="bytes per dispatch slot (bounds rows per dispatch)")
    add_flag(p, "--epoch", type=int, default=0, help="initial placement epoch")
    add_flag(p, "--scheduler", default=None,
             help="scheduler gRPC address to register with (optional)")


def build(args: argparse.Namespace) -> ExpertConfig:
    return ExpertConfig(
        model_dir=args.model, expert_ids=parse_expert_ids(args.experts),
        node_id=args.node_id or f"expert-{os.getpid()}", m2n_sender_id=args.m2n_sender_id,
        host=args.host, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        m2n_url=args.m2n_url, slot_bytes=args.slot_bytes, epoch=args.epoch,
        scheduler=args.scheduler,
        threads=threads_from(args), device=pick_device(args.device), dtype=args.dtype)
