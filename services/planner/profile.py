"""Profiling this machine with torch: the measured side of the performance model.

``services/core/layers.py`` did not exist when this was written, so the layers are timed as
plain torch ops shaped like the model's: attention = QKV projection, scaled-dot-product attention
of one new token against ``seq_len`` cached tokens (GQA), output projection and the router;
expert = one SwiGLU FFN (gate/up GEMM, SiLU·mul, down GEMM). Timings are medians over repeats,
one thread (``torch.set_num_threads(1)``), in the chosen dtype.

torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

from services.errors import UserError

from .hardware import HardwareProfile, HardwareSpec
from .models import PRESETS, MoEShape
from .perf_model import (
    LatencyCurve,
    expert_batch,
    iteration_time,
)

# A small Mixtral-like shape that a CPU profiles in seconds; the default for `plan --profile`.
LOCAL_SHAPE = PRESETS["local-tiny-moe"]
ATTN_BATCHES = (1, 2, 4, 8, 16, 32)
EXPERT_BATCHES = (1, 4, 16, 64, 256)
# Same-host shared-memory transport: fixed cost per message (notification + wake-up). A guess,
# not measured here; libm2n's benchmark measures the real figure.
SHM_MSG_LATENCY_S = 50e-6


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"profile dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def profile_attention(shape: MoEShape, seq_len: int, batches=ATTN_BATCHES, repeats: int = 5,
                      dtype: str = "float32") -> list[tuple[float, float]]:
    """(batch, seconds) for one attention layer of ``shape`` at context ``seq_len``."""
    import torch

    torch.set_num_threads(1)
    dt = _dtype(dtype)
    h, d = shape.hidden, shape.head_dim
    q_dim, kv_dim = shape.heads * d, shape.kv_heads * d
    w_qkv = torch.randn(h, q_dim + 2 * kv_dim, dtype=dt) * 0.02
    w_o = torch.randn(q_dim, h, dtype=dt) * 0.02
    w_router = torch.randn(h, shape.experts, dtype=dt) * 0.02
    out = []
    for b in batches:
        x = torch.randn(b, h, dtype=dt)
        k_cache = torch.randn(b, shape.kv_heads, seq_len, d, dtype=dt)  # [b, kv_heads, s, d]
        v_cache = torch.randn(b, shape.kv_heads, seq_len, d, dtype=dt)

        def step(x=x, k_cache=k_cache, v_cache=v_cache, b=b):
            with torch.inference_mode():
                qkv = x @ w_qkv  # [b, q + 2kv]
                q = qkv[:, :q_dim].view(b, shape.heads, 1, d)
                att = torch.nn.functional.scaled_dot_product_attention(
                    q, k_cache, v_cache, enable_gqa=True)  # [b, heads, 1, d]
                y = att.reshape(b, q_dim) @ w_o
                logits = (x + y) @ w_router
                return torch.topk(torch.softmax(logits, dim=-1), shape.top_k, dim=-1)

        out.append((float(b), _median_time(step, repeats)))
    return out


def profile_expert(shape: MoEShape, batches=EXPERT_BATCHES, repeats: int = 5,
                   dtype: str = "float32") -> list[tuple[float, float]]:
    """(tokens, seconds) for one expert's SwiGLU FFN of ``shape``."""
    import torch

    torch.set_num_threads(1)
    dt = _dtype(dtype)
    h, inter = shape.hidden, shape.expert_intermediate
    w_gu = torch.randn(h, 2 * inter, dtype=dt) * 0.02
    w_down = torch.randn(inter, h, dtype=dt) * 0.02
    out = []
    for b in batches:
        x = torch.randn(b, h, dtype=dt)

        def step(x=x):
            with torch.inference_mode():
                gate, up = (x @ w_gu).chunk(2, dim=-1)
                return (torch.nn.functional.silu(gate) * up) @ w_down

        out.append((float(b), _median_time(step, repeats)))
    return out


def measure_copy_gbs(mbytes: int = 64, repeats: int = 5) -> float:
    """Memory-copy bandwidth (GB/s, bytes read + written counted once) of a large tensor."""
    import torch

    src = torch.empty(mbytes * 2**20, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), repeats)
    return src.numel() / t / 1e9


def profile_machine(shape: MoEShape = LOCAL_SHAPE, seq_len: int = 128, repeats: int = 5,
                    dtype: str = "float32", name: str = "local-cpu") -> HardwareProfile:
    """Profile this machine for ``shape``: per-layer latency points plus a fitted spec (peak
    rates = measured rates, efficiencies 1) usable for other shapes via the roofline."""
    import psutil

    attn = profile_attention(shape, seq_len, repeats=repeats, dtype=dtype)
    expert = profile_expert(shape, repeats=repeats, dtype=dtype)
    copy_gbs = measure_copy_gbs(repeats=repeats)
    elem = 4 if dtype == "float32" else 2
    # Achieved GEMM rate at the largest expert batch; memory bandwidth from the copy.
    b_big, t_big = expert[-1]
    tflops = 2 * shape.expert_params_per_layer * b_big / t_big / 1e12
    k3, k4 = LatencyCurve(tuple(expert)).fit()
    weight_read = elem * shape.expert_params_per_layer / (copy_gbs * 1e9)
    spec = HardwareSpec(
        name=name, memory_gb=psutil.virtual_memory().total / 1e9, tflops=tflops,
        mem_bw_gbs=copy_gbs, price=1.0, nic_gbs=copy_gbs, intra_bw_gbs=copy_gbs,
        compute_eff=1.0, mem_eff=1.0, overhead_us=max(0.0, (k4 - weight_read) * 1e6),
        gpus_per_node=1,
    )
    return HardwareProfile(spec=spec, model=shape.name, seq_len=seq_len,
                           attention_points=tuple(attn), expert_points=tuple(expert),
                           copy_gbs=copy_gbs, device="cpu",
                           notes=f"torch ops shaped like {shape.name} layers, {dtype}, 1 thread",
                           extra={"dtype": dtype, "repeats": repeats})


def predict_local(profile: HardwareProfile, shape: MoEShape, batch: int, m: int,
                  n_attention: int = 1, expert_nodes: int = 1) -> dict:
    """Predicted decode throughput (tokens/s) of a local deployment measured by a profile.

    The local configuration (bench/pingpong.py's): ``n_attention`` replicas each holding
    ``batch`` sequences split into ``m`` micro-batches, ``expert_nodes`` expert processes
    sharing the E experts, shared-memory transport on the same host (``T_c`` = per-message
    latency + bytes / copy bandwidth). Uses the profile's measured points, so ``shape`` must be
    the shape the profile was taken for; at ``m >= 2``, with a profile that has co-run points,
    the two sides' mutual slowdown while they overlap (:func:`_with_contention`). Returns the
    inputs of the prediction too.
    """
    if profile.model != shape.name:
        raise UserError(f"profile was taken for {profile.model!r}, not {shape.name!r}; "
                        f"re-run `megascale plan --profile --model ...`")
    if batch < m or m < 1:
        raise UserError(f"batch ({batch}) must be >= m ({m}) >= 1")
    b_a = batch / m
    a_curve = LatencyCurve(profile.attention_points)
    e_curve = LatencyCurve(profile.expert_points)
    g = shape.experts / expert_nodes
    b_e = expert_batch(b_a, n_attention, shape.top_k, shape.experts)
    t_a = a_curve(b_a)
    elem = 4 if profile.extra.get("dtype", "float32") == "float32" else 2
    step = 0.0
    overlapped = False
    if profile.extra.get("expert_points") == "node":
        # Profiled with the real core (profile_checkpoint): expert points are one node's
        # compute over a micro-batch's tokens (all its experts, grouped GEMMs); a dispatch
        # carries each token row once with its K ids and weights (services/core/moe_wire).
        b_node = b_a * n_attention / expert_nodes
        t_e = e_curve(b_node)
        t_c = LatencyCurve(tuple(map(tuple, profile.extra["transfer_points"])))(b_a)
        step = LatencyCurve(tuple(map(tuple, profile.extra["step_points"])))(batch)
        overlapped = m >= 2 and "attention_points_corun" in profile.extra
        if overlapped:
            t_a, t_e = _with_contention(profile, t_a, t_e, b_a, b_node)
    else:
        t_e = g * e_curve(b_e)
        msg = b_a * shape.top_k * shape.hidden * elem / expert_nodes
        t_c = SHM_MSG_LATENCY_S + msg * expert_nodes / (profile.copy_gbs * 1e9)
    total = iteration_time(t_a, t_e, t_c, m, shape.layers) + step
    return {"tokens_per_s": n_attention * batch / total, "tbt_ms": total * 1e3,
            "t_a_ms": t_a * 1e3, "t_e_ms": t_e * 1e3, "t_c_ms": t_c * 1e3,
            "step_overhead_ms": step * 1e3, "b_a": b_a, "b_e": b_e, "m": m, "batch": batch,
            "co_run": overlapped}


def _with_contention(profile: HardwareProfile, t_a: float, t_e: float, b_a: float,
                     b_node: float) -> tuple[float, float]:
    """Per-call times of an overlapped pipeline (m >= 2) on one host.

    A side is slowed by the other only while the other computes. In the steady ping-pong
    every call of the slower side overlaps a call of the faster side for the faster one's
    duration, so the slower side meets contention for ``T_fast / T_slow`` of its time and the
    faster side for all of it. Contended time runs at the co-run speed (profile_checkpoint's
    ``*_points_corun``, measured with the other side busy on the other CPU)."""
    co_a = LatencyCurve(tuple(map(tuple, profile.extra["attention_points_corun"])))(b_a)
    co_e = LatencyCurve(tuple(map(tuple, profile.extra["expert_points_corun"])))(b_node)
    share_a, share_e = min(1.0, co_e / co_a), min(1.0, co_a / co_e)
    return (t_a + share_a * max(0.0, co_a - t_a), t_e + share_e * max(0.0, co_e - t_e))


# ----------------------------------------------------------------------------- real layers
CORE_BATCHES = (8, 16, 32, 64, 128)


def profile_checkpoint(model_dir: str, shape: MoEShape, seq_len: int = 32,
                       batches=CORE_BATCHES, repeats: int = 7,
                       name: str = "local-cpu", corun: bool = True) -> HardwareProfile:
    """Profile this machine with the **real** model core on a checkpoint (what the engine runs).

    Per micro-batch of ``b`` decode tokens at context ``seq_len``: ``attention_points`` time what
    the engine counts as T_a (:func:`corun.attention_pass`: attention block, packing its
    dispatch, adding the combine); ``expert_points`` time one ``ExpertSide.forward`` over all
    experts (one expert node's compute for that micro-batch, grouped GEMMs); ``step_points``
    time what a step does once (:func:`corun.step_pass`: batch metadata, embedding, final norm
    + LM head over ``b`` rows, greedy sampling).
    ``transfer_points`` time T_c, one direction of a real dispatch/combine round trip without
    compute (:func:`measure_moe_transfer`). One torch thread, float32.

    With ``corun`` and two CPUs, both sides are timed again while a second process runs the
    other side's work on the other CPU (:class:`corun.CoRunner`): ``extra`` gets
    ``attention_points_corun`` / ``expert_points_corun``, the per-call times of an overlapped
    (m >= 2) pipeline on one host.
    """
    import torch

    from services.core.checkpoint import CheckpointIndex
    from services.core.config import ModelConfig
    from services.core.model import AttentionSide, ExpertSide
    from services.core.runtime import configure_threads

    from . import corun as co

    configure_threads(1)  # the same thread count and allocator settings as the served roles
    cfg = ModelConfig.from_pretrained(model_dir)
    index = CheckpointIndex.open(model_dir)
    attn = AttentionSide.from_pretrained(model_dir, cfg=cfg, index=index)
    experts = ExpertSide.from_pretrained(model_dir, cfg=cfg, index=index)
    # Time every sparse layer in turn (per-layer mean): cycling layers keeps the weights as
    # cold in cache as they are in a real decode step, where one layer's hot reuse does not
    # happen.
    layers = [i for i, sparse in enumerate(cfg.sparse_layers) if sparse]
    n = len(layers)
    inputs = {}
    for b in batches:
        batch = co.decode_batch(attn, b, seq_len)
        with torch.inference_mode():
            mi = attn.attention_block(layers[0], batch.hidden, batch.meta, batch.kv)
        inputs[b] = (batch, (mi.normed, mi.topk_ids, mi.topk_weights))

    def time_attention(b: int) -> float:
        return _median_time(lambda: co.attention_pass(attn, layers, inputs[b][0]), repeats) / n

    def time_experts(b: int) -> float:
        return _median_time(lambda: co.expert_pass(experts, layers, *inputs[b][1]), repeats) / n

    cpus = co.spare_cpus() if corun else None
    extra: dict = {"dtype": "float32", "repeats": repeats, "source": "core",
                   "expert_points": "node"}
    # Solo and co-run timings on the same CPU (as a served role is pinned to its core).
    with co.pinned(cpus[0]) if cpus is not None else contextlib.nullcontext():
        a_pts = [(float(b), time_attention(b)) for b in batches]
        e_pts = [(float(b), time_experts(b)) for b in batches]
        extra["step_points"] = [
            (float(b), _median_time(lambda b=b: co.step_pass(attn, inputs[b][0]), repeats))
            for b in batches]
        if cpus is not None:
            for side, timer, key in (("experts", time_attention, "attention_points_corun"),
                                     ("attention", time_experts, "expert_points_corun")):
                with co.CoRunner(model_dir, side, seq_len, cpus[1]) as hog:
                    points = []
                    for b in batches:
                        hog.set_batch(b)
                        points.append((float(b), timer(b)))
                extra[key] = points
    copy_gbs = measure_copy_gbs(repeats=repeats)
    extra["transfer_points"] = [
        (float(b), measure_moe_transfer(b, cfg.hidden_size, cfg.top_k, cfg.num_experts,
                                        repeats=max(20, 4 * repeats))) for b in batches]
    b_big, t_big = e_pts[-1]
    tflops = 2 * shape.expert_params_per_layer * shape.top_k / shape.experts * b_big / t_big / 1e12
    import psutil

    spec = HardwareSpec(name=name, memory_gb=psutil.virtual_memory().total / 1e9,
                        tflops=max(tflops, 1e-6),
                        mem_bw_gbs=copy_gbs, price=1.0, nic_gbs=copy_gbs, intra_bw_gbs=copy_gbs,
                        compute_eff=1.0, mem_eff=1.0, overhead_us=0.0, gpus_per_node=1)
    corun_note = ", co-run points on 2 CPUs" if cpus is not None else ""
    return HardwareProfile(spec=spec, model=shape.name, seq_len=seq_len,
                           attention_points=tuple(a_pts), expert_points=tuple(e_pts),
                           copy_gbs=copy_gbs, device="cpu",
                           notes=f"real core layers on {model_dir}, float32, 1 thread"
                                 f"{corun_note}",
                           extra=extra)


def measure_moe_transfer(rows: int, hidden: int, top_k: int, num_experts: int,
                         repeats: int = 30) -> float:
    """T_c (s): one direction of a real MoE dispatch/combine round trip without the expert
    compute, over libm2n ``shm://`` in this process (an echo thread plays the expert node).

    The round trip runs the engine's own host-side work around the transfer: the replica packs
    the dispatch (:func:`moe_wire.pack_dispatch`) and sends it; the "expert" unpacks and checks
    it (:func:`moe_wire.unpack_dispatch`), copies the rows out of the slot and sends a
    ``[rows, H]`` reply; the replica adds the reply into a zeroed buffer. Median over
    ``repeats`` round trips, halved.
    """
    import os
    import threading

    import torch

    import libm2n
    from services.core import moe_wire

    size = moe_wire.dispatch_bytes(rows, hidden, top_k, torch.float32)
    name = f"m2n-probe-{os.getpid()}-{rows}"
    rx_a = libm2n.open_receiver(f"shm://{name}-a", libm2n.ReceiverConfig(slot_bytes=size))
    rx_b = libm2n.open_receiver(f"shm://{name}-b", libm2n.ReceiverConfig(slot_bytes=size))
    normed = torch.randn(rows, hidden)
    ids = torch.randint(0, num_experts, (rows, top_k))
    weights = torch.rand(rows, top_k)
    stop = threading.Event()

    def expert() -> None:
        tx = libm2n.connect(rx_a.url, libm2n.SenderConfig(sender_id=2))
        while not stop.is_set():
            try:
                msg = rx_b.recv(timeout=0.2)
            except TimeoutError:
                continue
            with msg:
                x, _ids, _w = moe_wire.unpack_dispatch(msg.tensor(), hidden, top_k, num_experts,
                                                       torch.float32)
                x = x.clone()  # the node copies the rows out of the slot before computing
            tx.send(x).result()
        tx.close()

    thread = threading.Thread(target=expert, daemon=True)
    thread.start()
    tx = libm2n.connect(rx_b.url, libm2n.SenderConfig(sender_id=1))
    try:
        samples = []
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            tx.send(moe_wire.pack_dispatch(normed, ids, weights)).result()
            with rx_a.recv(timeout=10) as msg:
                torch.zeros(rows, hidden).add_(msg.tensor())
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples[3:]) / 2
    finally:
        stop.set()
        thread.join(timeout=5)
        tx.close()
        rx_a.close()
        rx_b.close()
