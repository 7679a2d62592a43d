"""The colocated baseline: the same model served the way vLLM / TensorRT-LLM / SGLang do.

Every GPU of an instance holds a share of everything. ``tp_attn`` GPUs form a tensor-parallel
attention group (holding a full copy of attention weights and the KV cache of its sequences);
``gpus / tp_attn`` such groups run data-parallel; the experts are spread over all ``gpus``
(expert parallelism; tensor parallelism inside an expert when ``gpus > E``). ``gpus == tp_attn``
is plain TP=EP on one node. Each layer runs attention, then the MoE, then the exchange, one
after the other (no micro-batch overlap). The roofline is the same one the disaggregated plan
uses (:mod:`perf_model`), so the ratio between the two compares architectures, not models.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import HardwareSpec
from .models import BYTES, MoEShape
from .perf_model import (
    allreduce_bytes_factor,
    kv_bytes_per_seq,
    roofline_attention,
    transfer_time,
)

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ColocatedPlan:
    """The best colocated configuration found for one GPU type (times in seconds)."""

    gpu: str
    gpus: int
    tp_attn: int
    batch: int
    iteration_time: float
    tokens_per_s: float
    price: float

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.gpus

    @property
    def tokens_per_s_per_cost(self) -> float:
        return self.tokens_per_s / (self.gpus * self.price)

    def to_json(self) -> dict:
        return {"gpu": self.gpu, "gpus": self.gpus, "tp_attn": self.tp_attn, "batch": self.batch,
                "tbt_ms": self.iteration_time * 1e3, "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "tokens_per_s_per_cost": self.tokens_per_s_per_cost}


def max_batch(shape: MoEShape, hw: HardwareSpec, gpus: int, tp_attn: int, seq_len: int) -> int:
    """Most sequences the instance holds: per GPU, attention weights/tp_attn + all experts/gpus +
    its group's KV/tp_attn must fit."""
    weights = BYTES * (shape.attn_params / tp_attn + shape.experts * shape.expert_params / gpus)
    free = hw.usable_bytes - weights
    if free <= 0:
        return 0
    dp = gpus // tp_attn
    per_group = int(free * tp_attn // kv_bytes_per_seq(shape, seq_len))
    return per_group * dp


def iteration_time(shape: MoEShape, hw: HardwareSpec, gpus: int, tp_attn: int, batch: int,
                   seq_len: int) -> float:
    """Seconds for one decode iteration of ``batch`` sequences on the instance."""
    dp = gpus // tp_attn
    t_attn = roofline_attention(shape, hw, tp_attn, seq_len)(batch / dp)
    # MoE on one GPU: its 1/gpus share of the token-expert pairs and of the activated experts.
    e, k = shape.experts, shape.top_k
    activated = e * (1 - (1 - k / e) ** batch)
    p = shape.expert_params_per_layer
    mem = BYTES * p * activated / gpus
    flops = 2 * p * batch * k / gpus
    t_moe = max(mem / hw.mem_bw, flops / hw.flops) + hw.overhead_us * 1e-6
    row = shape.hidden * BYTES
    if dp == 1:  # TP experts: one all-reduce of the MoE output
        t_comm = allreduce_bytes_factor(gpus) * batch * row / (hw.intra_bw_gbs * 1e9)
    else:  # EP: dispatch + combine all-to-all of each group's token rows
        per_gpu = (batch / dp) * k * row / tp_attn * (1 - 1 / gpus)
        msg = per_gpu / gpus
        if gpus <= hw.gpus_per_node:
            one_way = per_gpu / (hw.intra_bw_gbs * 1e9)
        else:
            one_way = transfer_time(per_gpu, msg, hw.nic_gbs, 1)
        t_comm = 2 * one_way
    return shape.layers * (t_attn + t_moe + t_comm)


def search_colocated(shape: MoEShape, hw: HardwareSpec, slo_s: float, seq_len: int,
                     max_gpus: int | None = None, attention_dp: bool = False
                     ) -> ColocatedPlan | None:
    """Best tokens/s per GPU over instance sizes, largest batch meeting the SLO (binary search).

    Default (vLLM / TensorRT-LLM style): attention tensor-parallel over the whole node
    (``tp_attn = min(gpus, gpus_per_node)``), data-parallel only across nodes.
    ``attention_dp=True`` also tries smaller attention TP groups inside a node (SGLang's
    DP-attention + EP, a stronger baseline). None when nothing fits or meets the SLO."""
    best: ColocatedPlan | None = None
    for gpus in GPU_COUNTS:
        if max_gpus is not None and gpus > max_gpus:
            break
        for tp_attn in (1, 2, 4, 8):
            if tp_attn > gpus or tp_attn > hw.gpus_per_node or gpus % tp_attn:
                continue
            if not attention_dp and tp_attn != min(gpus, hw.gpus_per_node):
                continue
            dp = gpus // tp_attn
            hi = max_batch(shape, hw, gpus, tp_attn, seq_len)
            if hi < dp or iteration_time(shape, hw, gpus, tp_attn, dp, seq_len) > slo_s:
                continue
            lo = dp  # feasible
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if iteration_time(shape, hw, gpus, tp_attn, mid, seq_len) <= slo_s:
                    lo = mid
                else:
                    hi = mid - 1
            t = iteration_time(shape, hw, gpus, tp_attn, lo, seq_len)
            plan = ColocatedPlan(hw.name, gpus, tp_attn, lo, t, lo / t, hw.price)
            if best is None or plan.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu:
                best = plan
    return best
