"""``megascale serve scheduler``: flags -> :class:`SchedulerConfig` -> :func:`serve`."""

from __future__ import annotations

import argparse
import os

from services.common.flags import add_flag, add_server_flags
from services.errors import ConfigError
from services.scheduler.config import SchedulerConfig, Settings, num_experts_from_model
from services.scheduler.server import serve

__all__ = ["add_arguments", "build", "serve"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p)
    add_flag(p, "--redis-url", required=True, help="Redis holding membership and placement, "
             "e.g. redis://127.0.0.1:6379/0")
    add_flag(p, "--key-prefix", default="megascale:",
             help="prefix of every Redis key (clusters sharing a Redis use different ones)")
    add_flag(p, "--node-ttl", type=float, default=5.0,
             help="lease in seconds: a node silent for longer has left")
    add_flag(p, "--model", default=None,
             help="checkpoint directory; its config.json gives the expert count")
    add_flag(p, "--num-experts", type=int, default=None,
             help="experts per MoE layer (instead of --model)")
    add_flag(p, "--micro-batches", type=int, default=2,
             help="m handed to attention replicas (DeploymentSettings)")
    add_flag(p, "--max-batch-tokens", type=int, default=512,
             help="tokens per engine step handed to attention replicas")
    add_flag(p, "--max-running-requests", type=int, default=64,
             help="running requests per replica handed to attention replicas")
    add_flag(p, "--dispatch-timeout-ms", type=int, default=10_000,
             help="re-send a dispatch with no reply after this long (ms)")
    add_flag(p, "--replicate-hot", type=int, default=2,
             help="extra replicas of hot experts the placement may add (total)")
    add_flag(p, "--expert-replicas", type=int, default=1,
             help="copies of every expert, each on a different expert node (at most the "
                  "number of nodes holding it); attention replicas spread rows over the "
                  "copies and fail over to a surviving one")
    add_flag(p, "--load-timeout", type=float, default=120.0,
             help="seconds an elastic expert node (--experts auto) may take to load the "
                  "experts it is assigned")
    add_flag(p, "--stats-interval", type=float, default=2.0,
             help="seconds between Expert.GetStats polls (expert load)")
    add_flag(p, "--quarantine-after", type=float, default=10.0,
             help="plan out an expert node that most attention replicas route around for this "
                  "many seconds while its lease holds (0 = never)")
    add_flag(p, "--quarantine-hold", type=float, default=30.0,
             help="seconds a quarantined node stays out (doubles per repeat)")
    add_flag(p, "--quarantine-max-hold", type=float, default=600.0,
             help="cap of the doubling quarantine hold, in seconds")


def build(args: argparse.Namespace) -> SchedulerConfig:
    model_name = ""
    num_experts = args.num_experts
    if args.model:
        n, model_name = num_experts_from_model(args.model)
        if num_experts is not None and num_experts != n:
            raise ConfigError(f"--num-experts {num_experts} disagrees with {args.model}/"
                              f"config.json ({n} experts)")
        num_experts = n
    if num_experts is None:
        raise ConfigError("give --model (a checkpoint directory) or --num-experts")
    return SchedulerConfig(
        redis_url=args.redis_url, num_experts=num_experts, model=model_name,
        node_id=args.node_id or f"scheduler-{os.getpid()}", host=args.host,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, key_prefix=args.key_prefix,
        node_ttl_s=args.node_ttl,
        settings=Settings(micro_batches=args.micro_batches,
                          max_batch_tokens=args.max_batch_tokens,
                          max_running_requests=args.max_running_requests,
                          dispatch_timeout_ms=args.dispatch_timeout_ms),
        replicate_hot=args.replicate_hot, stats_interval_s=args.stats_interval,
        quarantine_after_s=args.quarantine_after, quarantine_hold_s=args.quarantine_hold,
        quarantine_max_hold_s=args.quarantine_max_hold,
        expert_replicas=args.expert_replicas, load_timeout_s=args.load_timeout)
