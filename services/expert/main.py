"""``megascale serve expert``: flags -> :class:`ExpertConfig` -> :func:`serve`."""

from __future__ import annotations

import argparse
import os
import socket
import zlib

from services.common.flags import add_compute_flags, add_flag, add_server_flags, threads_from
from services.core.runtime import pick_device
from services.errors import ConfigError
from services.expert.config import (
    ExpertConfig,
    parse_expert_ids,
    parse_shard,
    partition_experts,
)
from services.expert.server import serve

__all__ = ["add_arguments", "build", "serve"]

SENDER_ID_BASE = 1 << 16  # expert nodes' libm2n ids sit above the attention replicas' (0..)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p)
    add_compute_flags(p)
    add_flag(p, "--experts", required=True,
             help="expert ids hosted, e.g. 0,1,4-7; or shard:I/N for the I-th of N even "
                  "shards (a StatefulSet passes its pod index); or auto: host what the "
                  "scheduler assigns (needs --scheduler; loaded from --model on demand)")
    add_flag(p, "--m2n-sender-id", type=int, default=None,
             help="this node's id on its reply links (default 65536 + I for --experts "
                  "shard:I/N, 65536 + a hash of --node-id for auto, else 65536); unique "
                  "among expert nodes")
    add_flag(p, "--max-batch-tokens", type=int, default=512,
             help="the attention replicas' --max-batch-tokens: one dispatch slot holds that "
                  "many rows of this model in --dtype")
    add_flag(p, "--slot-bytes", type=int, default=0,
             help="bytes per dispatch slot; 0 = derive from --max-batch-tokens")
    add_flag(p, "--max-attention-replicas", type=int, default=64,
             help="reply links given slot memory: the receiver refuses senders past this "
                  "many replicas' worth (bounds what any peer can take)")
    add_flag(p, "--epoch", type=int, default=0, help="initial placement epoch")
    add_flag(p, "--scheduler", default=None,
             help="scheduler gRPC address to register with (optional)")


def build(args: argparse.Namespace) -> ExpertConfig:
    elastic = args.experts.strip() == "auto"
    if elastic and not args.scheduler:
        raise ConfigError("--experts auto needs --scheduler: the scheduler assigns the experts")
    # An elastic pool's nodes are alike (a Deployment's pods, all pid 1): the host name tells
    # them apart when no --node-id is given.
    node_id = args.node_id or (f"expert-{socket.gethostname()}-{os.getpid()}" if elastic
                               else f"expert-{os.getpid()}")
    return ExpertConfig(
        model_dir=args.model, expert_ids=() if elastic else resolve_experts(args.experts,
                                                                              args.model),
        node_id=node_id, elastic=elastic,
        m2n_sender_id=args.m2n_sender_id if args.m2n_sender_id is not None
        else default_sender_id(args.experts, node_id),
        host=args.host, advertise_host=args.advertise_host, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        m2n_url=args.m2n_url, max_batch_tokens=args.max_batch_tokens,
        slot_bytes=args.slot_bytes, max_attention_replicas=args.max_attention_replicas,
        epoch=args.epoch,
        scheduler=args.scheduler,
        threads=threads_from(args), device=pick_device(args.device), dtype=args.dtype)


def default_sender_id(spec: str, node_id: str) -> int:
    """The reply-link sender id when ``--m2n-sender-id`` is not given: distinct per shard,
    and per node id for elastic nodes (their node ids are unique; a hash keeps it stable
    across restarts)."""
    if spec.startswith("shard:"):
        return SENDER_ID_BASE + parse_shard(spec)[0]
    if spec.strip() == "auto":
        return SENDER_ID_BASE + zlib.crc32(node_id.encode()) % (1 << 31)
    return SENDER_ID_BASE


def resolve_experts(spec: str, model_dir: str) -> tuple[int, ...]:
    """``--experts`` as ids: a list, or ``shard:I/N`` split evenly over the model's experts."""
    if not spec.startswith("shard:"):
        return parse_expert_ids(spec)
    from services.core.config import ModelConfig

    index, count = parse_shard(spec)
    num = ModelConfig.from_pretrained(model_dir).num_experts
    if count > num:
        raise ConfigError(f"--experts {spec}: {count} shards but the model has {num} experts")
    return tuple(partition_experts(num, count)[index])
