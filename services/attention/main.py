"""``megascale serve attention``: flags -> :class:`AttentionConfig` -> :func:`serve`."""

from __future__ import annotations

import argparse
import os

from services.attention.batching import BatchingConfig
from services.attention.config import AttentionConfig
from services.attention.server import CPU_NUM_BLOCKS, serve
from services.common.flags import add_compute_flags, add_flag, add_server_flags, threads_from
from services.core.runtime import pick_device

__all__ = ["add_arguments", "build", "serve"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p)
    add_compute_flags(p)
    add_flag(p, "--expert-nodes", default=None,
             help="comma list of the expert nodes' gRPC addresses; without it (needs "
                  "--scheduler) the nodes come from the scheduler's placement")
    add_flag(p, "--local-experts", action="store_true",
             help="colocated mode: compute every expert in this process (no expert nodes)")
    add_flag(p, "--m2n-sender-id", type=int, default=0,
             help="this replica's id on libm2n links (unique among attention replicas)")
    add_flag(p, "--micro-batches", type=int, default=2, help="m, micro-batches per step")
    add_flag(p, "--stream-interval", type=int, default=1,
             help="send a request's tokens every N tokens (fewer stream writes under load)")
    add_flag(p, "--block-size", type=int, default=16, help="KV cache block size (tokens)")
    add_flag(p, "--num-blocks", type=int, default=None,
             help="KV cache blocks (default: on CUDA as many as --gpu-memory-utilization "
                  f"allows, on CPU {CPU_NUM_BLOCKS})")
    add_flag(p, "--gpu-memory-utilization", type=float, default=0.9,
             help="on CUDA, the fraction of the card's memory this replica may use (weights, "
                  "activations and the KV cache, which gets the rest)")
    add_flag(p, "--max-num-seqs", type=int, default=64, help="running requests per step")
    add_flag(p, "--max-batch-tokens", type=int, default=512, help="tokens per step")
    add_flag(p, "--max-model-len", type=int, default=4096, help="prompt + output tokens")
    add_flag(p, "--enable-prefix-caching", action=argparse.BooleanOptionalAction,
             default=True,
             help="share the KV blocks of a prompt prefix seen before (full blocks, by content "
                  "hash; cached blocks are evicted least recently used when the pool runs dry)")
    add_flag(p, "--served-model-name", default="",
             help="the model name clients use (the model_name label of the metrics; default: "
                  "the model directory's name)")
    add_flag(p, "--scheduler", default=None,
             help="scheduler gRPC address to register with (optional)")
    add_flag(p, "--expert-timeout", type=float, default=10.0,
             help="seconds to wait for an expert node's replies before marking it down (its "
                  "rows go to other replicas; requests fail when an expert has none left)")
    add_flag(p, "--expert-wait", type=float, default=30.0,
             help="seconds requests pause (and then resume) while an expert they need has no "
                  "live replica, waiting for a placement that serves it; then they fail")
    add_flag(p, "--expert-readmit", type=float, default=30.0,
             help="seconds after which a node marked down is tried again if its link is "
                  "healthy (a hang that ended); 0 = only a new placement epoch re-admits")


def build(args: argparse.Namespace) -> AttentionConfig:
    nodes = tuple(a for a in (args.expert_nodes or "").split(",") if a)
    return AttentionConfig(
        model_dir=args.model, expert_nodes=nodes,
        node_id=args.node_id or f"attention-{os.getpid()}", m2n_sender_id=args.m2n_sender_id,
        host=args.host, advertise_host=args.advertise_host, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        m2n_url=args.m2n_url, micro_batches=args.micro_batches,
        stream_interval=args.stream_interval, block_size=args.block_size,
        num_blocks=args.num_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        batching=BatchingConfig(max_num_seqs=args.max_num_seqs,
                                  max_batch_tokens=args.max_batch_tokens,
                                  max_model_len=args.max_model_len),
        enable_prefix_caching=args.enable_prefix_caching,
        served_model_name=args.served_model_name,
        expert_timeout_s=args.expert_timeout, expert_readmit_s=args.expert_readmit,
        expert_wait_s=args.expert_wait,
        scheduler=args.scheduler,
        threads=threads_from(args),
        device=pick_device(args.device), dtype=args.dtype, local_experts=args.local_experts)
