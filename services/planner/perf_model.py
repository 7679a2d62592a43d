"""The closed-form performance model of disaggregated expert parallelism (paper §4.2).

Per layer and per micro-batch:

- attention on one replica (``tp_a`` GPUs) with ``b_a`` sequences: ``T_a = k1·b_a + k2``;
- one expert node (``tp_e`` GPUs, ``g_e`` experts) with ``b_e`` tokens per expert:
  ``T_e = k3·b_e + k4``, where ``b_e = b_a·n_a·K/E`` (balanced routing);
- one direction of the M2N exchange: ``T_c`` from the message size, the per-GPU NIC bandwidth and
  a bandwidth-utilisation-vs-message-size curve.

A decode iteration (one token for every sequence) through ``L`` layers with ``m`` micro-batches:
``T_total = (T_a + T_e + 2·T_c) + T_f·(m·L − 1)`` with ``T_f = max(T_a, T_e)``, valid while the
pipeline keeps the slower side busy (``m·T_f >= T_a + T_e + 2·T_c``, implied by the paper's
``m >= 2(1 + T_c/T_f)`` when ``T_a ≈ T_e``). :func:`iteration_time` extends it to the other
regime (``L·R + (m−1)·T_f`` with round trip ``R = T_a + T_e + 2·T_c``) and to a link-bound
pipeline; the discrete-event simulator agrees with it exactly.

Latencies are :class:`LatencyCurve` objects: piecewise-linear through measured or roofline
points, extrapolated linearly, with :meth:`LatencyCurve.fit` giving the paper's ``(k, c)``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from services.errors import ConfigError

from .hardware import HardwareSpec
from .models import BYTES, MoEShape


@dataclass(frozen=True)
class LatencyCurve:
    """Seconds as a function of batch size: linear interpolation through ``points`` (sorted
    ``(batch, seconds)`` pairs), linear extrapolation beyond both ends, never below 0."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if len(self.points) < 2:
            raise ConfigError("a latency curve needs at least two (batch, seconds) points")
        xs = [p[0] for p in self.points]
        if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
            raise ConfigError(f"latency curve batches must be strictly increasing, got {xs}")
        object.__setattr__(self, "_xs", xs)

    @classmethod
    def linear(cls, k: float, c: float) -> LatencyCurve:
        """``T(b) = k·b + c``."""
        return cls(((0.0, c), (1.0, k + c)))

    def __call__(self, b: float) -> float:
        pts, xs = self.points, self._xs  # type: ignore[attr-defined]
        i = bisect.bisect_right(xs, b) - 1
        i = min(max(i, 0), len(pts) - 2)
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        return max(0.0, y0 + (y1 - y0) * (b - x0) / (x1 - x0))

    def fit(self) -> tuple[float, float]:
        """Least-squares ``(k, c)`` of ``T = k·b + c`` over the points (the paper's k's)."""
        n = len(self.points)
        mx = sum(p[0] for p in self.points) / n
        my = sum(p[1] for p in self.points) / n
        sxx = sum((p[0] - mx) ** 2 for p in self.points)
        k = sum((p[0] - mx) * (p[1] - my) for p in self.points) / sxx
        return k, my - k * mx

    def scaled(self, factor: float) -> LatencyCurve:
        return LatencyCurve(tuple((b, t * factor) for b, t in self.points))


def _roofline_curve(mem_fixed: float, mem_per_b: float, flops_per_b: float, linear_per_b: float,
                    fixed: float, hw: HardwareSpec) -> LatencyCurve:
    """``T(b) = max((mem_fixed + mem_per_b·b)/BW, flops_per_b·b/F) + linear_per_b·b + fixed``.

    A max of two lines plus a line is piecewise linear with one knee, so three points are exact.
    """
    a0, a1 = mem_fixed / hw.mem_bw, mem_per_b / hw.mem_bw
    c1 = flops_per_b / hw.flops
    knee = a0 / (c1 - a1) if c1 > a1 else 0.0

    def t(b: float) -> float:
        return max(a0 + a1 * b, c1 * b) + linear_per_b * b + fixed

    xs = [0.0, knee, 2 * knee] if knee > 0 else [0.0, 1.0]
    return LatencyCurve(tuple((x, t(x)) for x in xs))


def allreduce_bytes_factor(tp: int) -> float:
    """Ring all-reduce moves ``2(tp−1)/tp`` times the buffer through each GPU's link."""
    return 2 * (tp - 1) / tp if tp > 1 else 0.0


def roofline_attention(shape: MoEShape, hw: HardwareSpec, tp: int, seq_len: int) -> LatencyCurve:
    """``T_a(b_a)`` for one layer on one replica of ``tp`` GPUs at context ``seq_len``.

    Memory: attention/router/shared-expert weights once + every sequence's KV cache; compute:
    projections + QK/PV over the context; plus one all-reduce of the ``b_a × h`` output when
    ``tp > 1``. All divided over the ``tp`` GPUs.
    """
    p = shape.attn_params_per_layer
    mem_fixed = BYTES * p / tp
    mem_per_b = seq_len * shape.kv_bytes_per_token_layer / tp
    flops_per_b = (2 * p + seq_len * shape.attn_ctx_flops_per_token) / tp
    ar = allreduce_bytes_factor(tp) * shape.hidden * BYTES / (hw.intra_bw_gbs * 1e9)
    return _roofline_curve(mem_fixed, mem_per_b, flops_per_b, ar, hw.overhead_us * 1e-6, hw)


def roofline_expert(shape: MoEShape, hw: HardwareSpec, tp: int,
                    experts_per_node: int = 1) -> LatencyCurve:
    """``T_e(b_e)`` for one layer on one expert node (``tp`` GPUs holding ``experts_per_node``
    experts), ``b_e`` tokens per expert: SwiGLU GEMMs, plus the all-reduce of the down
    projection's output when ``tp > 1``."""
    g = experts_per_node
    p = shape.expert_params_per_layer
    mem_fixed = g * BYTES * p / tp
    flops_per_b = g * 2 * p / tp
    ar = g * allreduce_bytes_factor(tp) * shape.hidden * BYTES / (hw.intra_bw_gbs * 1e9)
    return _roofline_curve(mem_fixed, 0.0, flops_per_b, ar, hw.overhead_us * 1e-6, hw)


# Fraction of NIC line rate achieved vs message size (bytes). Shape typical of RDMA writes (small
# messages are latency-bound); approximate, not taken from the paper's figures.
BW_UTIL_CURVE: tuple[tuple[float, float], ...] = (
    (1e3, 0.02), (16e3, 0.15), (64e3, 0.40), (256e3, 0.70), (1e6, 0.85), (4e6, 0.90),
)


def bw_utilization(msg_bytes: float, curve: tuple[tuple[float, float], ...] = BW_UTIL_CURVE
                   ) -> float:
    """Utilisation for a message size: linear in log(size) between the curve's points,
    clamped to its ends."""
    if msg_bytes <= curve[0][0]:
        return curve[0][1]
    if msg_bytes >= curve[-1][0]:
        return curve[-1][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if msg_bytes <= x1:
            f = (math.log(msg_bytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return curve[-1][1]  # pragma: no cover


def transfer_time(total_bytes: float, msg_bytes: float, nic_gbs: float, n_gpus: int) -> float:
    """Seconds to move ``total_bytes`` (as messages of ``msg_bytes``) through ``n_gpus`` NICs of
    ``nic_gbs`` GB/s each."""
    if total_bytes <= 0:
        return 0.0
    return total_bytes / (n_gpus * nic_gbs * 1e9 * bw_utilization(msg_bytes))


def comm_time(shape: MoEShape, hw_a: HardwareSpec, hw_e: HardwareSpec, tp_a: int, tp_e: int,
              b_a: float, n_a: int, experts_per_node: int = 1) -> float:
    """``T_c``: one direction of the M2N exchange for one micro-batch and layer.

    A replica sends every token to its K experts: ``b_a·K·h`` bf16 values, as one message per
    expert node of ``b_a·K·g_e/E`` rows; an expert node receives ``b_e·g_e`` rows from the
    ``n_a`` replicas. The slower side bounds the exchange (combine moves the same bytes back).
    """
    row = shape.hidden * BYTES
    nodes = shape.experts / experts_per_node
    sent = b_a * shape.top_k * row
    msg = sent / nodes
    received = msg * n_a
    return max(transfer_time(sent, msg, hw_a.nic_gbs, tp_a),
               transfer_time(received, msg, hw_e.nic_gbs, tp_e))


def expert_batch(b_a: float, n_a: int, top_k: int, experts: int) -> float:
    """``b_e = b_a·n_a·K/E``: tokens each expert sees per micro-batch under balanced routing."""
    return b_a * n_a * top_k / experts


def kv_bytes_per_seq(shape: MoEShape, seq_len: int) -> float:
    """KV cache of one sequence over all layers (the paper's ``4·s·h·L/g`` for GQA)."""
    return seq_len * shape.layers * shape.kv_bytes_per_token_layer


def max_seqs_per_replica(shape: MoEShape, hw: HardwareSpec, tp: int, seq_len: int) -> int:
    """Largest ``m·b_a`` with ``m·b_a·kv_bytes_per_seq + 2·P_a <= tp·C_a`` (0: nothing fits)."""
    free = tp * hw.usable_bytes - BYTES * shape.attn_params
    if free <= 0:
        return 0
    return int(free // kv_bytes_per_seq(shape, seq_len))


def experts_fit(shape: MoEShape, hw: HardwareSpec, tp: int, experts_per_node: int = 1) -> bool:
    """Weight-fit constraint of an expert node: ``g_e·2·P_e <= tp_e·C_e``."""
    return experts_per_node * BYTES * shape.expert_params <= tp * hw.usable_bytes


def t_total(t_a: float, t_e: float, t_c: float, m: int, layers: int) -> float:
    """The paper's ``T_total = (T_a + T_e + 2·T_c) + T_f·(m·L − 1)``, ``T_f = max(T_a, T_e)``."""
    return (t_a + t_e + 2 * t_c) + max(t_a, t_e) * (m * layers - 1)


def pipeline_condition(t_a: float, t_e: float, t_c: float, m: int) -> bool:
    """The paper's sufficient condition ``m >= 2(1 + T_c/T_f)`` (and ``T_c < T_f``)."""
    t_f = max(t_a, t_e)
    return t_c < t_f and m >= 2 * (1 + t_c / t_f)


def iteration_time(t_a: float, t_e: float, t_c: float, m: int, layers: int) -> float:
    """Exact iteration time of the ping-pong pipeline for every ``m`` (FIFO resources).

    With round trip ``R = T_a + T_e + 2·T_c`` and bottleneck ``T_f = max(T_a, T_e, T_c)``
    (links are resources too): ``max(R + T_f·(m·L − 1), L·R + (m − 1)·T_f)``. The first term is
    the paper's ``T_total`` (bottleneck always busy), the second the latency-bound regime
    (``m·T_f < R``: micro-batches wait on their own round trip, e.g. ``m = 1``).
    """
    r = t_a + t_e + 2 * t_c
    t_f = max(t_a, t_e, t_c)
    return max(r + t_f * (m * layers - 1), layers * r + (m - 1) * t_f)


@dataclass(frozen=True)
class RoleCurves:
    """The latency curves of one (attention GPU, tp_a) × (expert GPU, tp_e, g_e) pairing."""

    attention: LatencyCurve
    expert: LatencyCurve


@dataclass(frozen=True)
class Estimate:
    """The model's prediction for one fully specified plan (times in seconds)."""

    b_a: float
    b_e: float
    t_a: float
    t_e: float
    t_c: float
    t_total: float
    batch: float  # global batch B = n_a·m·b_a sequences
    tokens_per_s: float
    util_attention: float
    util_expert: float


def estimate(shape: MoEShape, curves: RoleCurves, hw_a: HardwareSpec, hw_e: HardwareSpec,
             tp_a: int, tp_e: int, n_a: int, m: int, b_a: float,
             experts_per_node: int = 1, comm: float | None = None) -> Estimate:
    """Predict one decode iteration. ``comm`` overrides ``T_c`` (e.g. a measured value)."""
    b_e = expert_batch(b_a, n_a, shape.top_k, shape.experts)
    t_a = curves.attention(b_a)
    t_e = curves.expert(b_e)
    t_c = comm if comm is not None else comm_time(shape, hw_a, hw_e, tp_a, tp_e, b_a, n_a,
                                                  experts_per_node)
    total = iteration_time(t_a, t_e, t_c, m, shape.layers)
    batch = n_a * m * b_a
    busy = m * shape.layers
    return Estimate(b_a=b_a, b_e=b_e, t_a=t_a, t_e=t_e, t_c=t_c, t_total=total, batch=batch,
                    tokens_per_s=batch / total, util_attention=busy * t_a / total,
                    util_expert=busy * t_e / total)
