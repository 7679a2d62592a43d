"""Deployment-plan search (paper Algorithm 1, homogeneous and heterogeneous).

For every expert GPU type and ``tp_e`` in {1, 2, 4, 8} whose expert weights fit, every number of
experts per expert node ``g_e`` (powers of two dividing E; the paper uses 1), every attention GPU
type and ``tp_a`` whose weights + at least ``m`` sequences of KV fit, and ``m`` from 2 to
``N_m = 4``: choose ``n_a`` (BALANCE) and binary-search the largest per-micro-batch batch
``b_a`` whose iteration time meets the SLO and whose KV cache fits; keep the plan with the best
``(B / T_total) / (tp_a·n_a·Cost_a + tp_e·(E/g_e)·Cost_e)``.

BALANCE: the paper sets ``n_a`` so that ``T_a ≈ T_e``. When a side's fixed cost makes exact
balance impossible (e.g. an expert's weight read exceeds the attention time at every batch the
KV cache allows) the balanced ``n_a`` is not the best one, so we evaluate a geometric grid of
``n_a`` around it and keep the best objective; where balance is possible this picks the
balanced point or its neighbour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.errors import UserError

from .colocated import ColocatedPlan, search_colocated
from .hardware import HardwareProfile, HardwareSpec
from .models import BYTES, MoEShape
from .perf_model import (
    Estimate,
    LatencyCurve,
    RoleCurves,
    estimate,
    experts_fit,
    max_seqs_per_replica,
    roofline_attention,
    roofline_expert,
)

TP_DEGREES = (1, 2, 4, 8)
M_VALUES = (2, 3, 4)
MAX_ATTENTION_REPLICAS = 1024


@dataclass(frozen=True)
class Plan:
    """One deployment plan and its predicted performance."""

    model: str
    attention_gpu: str
    expert_gpu: str
    tp_a: int
    tp_e: int
    n_a: int
    experts_per_node: int
    expert_nodes: int
    m: int
    est: Estimate
    attention_price: float
    expert_price: float
    k: tuple[float, float, float, float]  # (k1, k2, k3, k4) of the fitted curves
    seq_len: int = 730
    colocated: ColocatedPlan | None = field(default=None, compare=False)

    @property
    def gpus(self) -> int:
        return self.tp_a * self.n_a + self.tp_e * self.expert_nodes

    @property
    def cost(self) -> float:
        return (self.tp_a * self.n_a * self.attention_price
                + self.tp_e * self.expert_nodes * self.expert_price)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.est.tokens_per_s / self.gpus

    @property
    def tokens_per_s_per_cost(self) -> float:
        return self.est.tokens_per_s / self.cost

    def to_json(self) -> dict:
        e, col = self.est, self.colocated
        out = {
            "model": self.model, "attention_gpu": self.attention_gpu,
            "expert_gpu": self.expert_gpu, "tp_a": self.tp_a, "tp_e": self.tp_e,
            "n_a": self.n_a, "experts_per_node": self.experts_per_node,
            "expert_nodes": self.expert_nodes, "m": self.m, "b_a": e.b_a, "b_e": e.b_e,
            "batch": int(e.batch), "gpus": self.gpus, "cost": self.cost,
            "t_a_ms": e.t_a * 1e3, "t_e_ms": e.t_e * 1e3, "t_c_ms": e.t_c * 1e3,
            "tbt_ms": e.t_total * 1e3, "tokens_per_s": e.tokens_per_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tokens_per_s_per_cost": self.tokens_per_s_per_cost,
            "util_attention": e.util_attention, "util_expert": e.util_expert,
            "k1": self.k[0], "k2": self.k[1], "k3": self.k[2], "k4": self.k[3],
            "colocated": col.to_json() if col else None,
            "per_gpu_vs_colocated": (self.tokens_per_s_per_gpu / col.tokens_per_s_per_gpu
                                     if col else None),
            "per_cost_vs_colocated": (self.tokens_per_s_per_cost / col.tokens_per_s_per_cost
                                      if col else None),
        }
        return out


CurveFn = Callable[[MoEShape, HardwareSpec, int, int], LatencyCurve]


def curve_source(profiles: Sequence[HardwareProfile] = ()) -> tuple[CurveFn, CurveFn]:
    """Attention and expert curve functions: measured points from a profile when it was taken
    for this model shape at ``tp == 1`` (and, for attention, at this context length), else the
    roofline from the spec."""
    by_name = {p.spec.name: p for p in profiles}

    def attention(shape: MoEShape, hw: HardwareSpec, tp: int, seq_len: int) -> LatencyCurve:
        p = by_name.get(hw.name)
        if (p and tp == 1 and p.model == shape.name and p.seq_len == seq_len
                and len(p.attention_points) >= 2):
            return LatencyCurve(p.attention_points)
        return roofline_attention(shape, hw, tp, seq_len)

    def expert(shape: MoEShape, hw: HardwareSpec, tp: int, g: int) -> LatencyCurve:
        p = by_name.get(hw.name)
        if p and tp == 1 and p.model == shape.name and len(p.expert_points) >= 2:
            return LatencyCurve(p.expert_points).scaled(g)  # g experts' GEMMs one after another
        return roofline_expert(shape, hw, tp, g)

    return attention, expert


def _experts_per_node_options(experts: int) -> list[int]:
    """Powers of two dividing E (1 is the paper's one expert per node)."""
    out, g = [], 1
    while g <= experts and experts % g == 0:
        out.append(g)
        g *= 2
    return out


def _n_a_grid(n_cap: int) -> list[int]:
    grid, n = [], 1
    while n <= n_cap:
        grid.append(n)
        n = max(n + 1, int(n * 1.2))
    if grid and grid[-1] != n_cap:
        grid.append(n_cap)
    return grid


def _largest_b_a(fn: Callable[[float], Estimate], b_max: int, slo_s: float) -> Estimate | None:
    """Binary search of the largest integer ``b_a`` in [1, b_max] meeting the SLO."""
    first = fn(1)
    if first.t_total > slo_s:
        return None
    lo, hi, best = 1, b_max, first
    while lo < hi:
        mid = (lo + hi + 1) // 2
        est = fn(mid)
        if est.t_total <= slo_s:
            lo, best = mid, est
        else:
            hi = mid - 1
    return best if best.b_a == lo else fn(lo)


def search(shape: MoEShape, attention_gpus: Sequence[HardwareSpec],
           expert_gpus: Sequence[HardwareSpec], slo_s: float = 0.150, seq_len: int = 730,
           max_gpus: int | None = None, m_values: Sequence[int] = M_VALUES,
           profiles: Sequence[HardwareProfile] = (), with_colocated: bool = True) -> Plan:
    """Algorithm 1. Raises UserError when the model fits nowhere or no plan meets the SLO."""
    if slo_s <= 0:
        raise UserError(f"SLO must be positive, got {slo_s * 1e3:g} ms")
    if seq_len < 1:
        raise UserError(f"sequence length must be >= 1, got {seq_len}")
    attn_curve, exp_curve = curve_source(profiles)
    best: Plan | None = None
    fits_a = fits_e = False
    fastest = float("inf")  # quickest iteration seen, for the "SLO impossible" message
    for hw_e in expert_gpus:
        for tp_e in TP_DEGREES:
            if tp_e > hw_e.gpus_per_node:
                continue
            for g in _experts_per_node_options(shape.experts):
                if not experts_fit(shape, hw_e, tp_e, g):
                    break  # more experts per node only need more memory
                fits_e = True
                nodes = shape.experts // g
                e_curve = exp_curve(shape, hw_e, tp_e, g)
                for hw_a in attention_gpus:
                    for tp_a in TP_DEGREES:
                        if tp_a > hw_a.gpus_per_node:
                            continue
                        cap = max_seqs_per_replica(shape, hw_a, tp_a, seq_len)
                        if cap < 1:
                            continue
                        fits_a = True
                        curves = RoleCurves(attn_curve(shape, hw_a, tp_a, seq_len), e_curve)
                        n_cap = MAX_ATTENTION_REPLICAS
                        if max_gpus is not None:
                            n_cap = min(n_cap, (max_gpus - tp_e * nodes) // tp_a)
                        for m in m_values:
                            b_max = cap // m
                            if b_max < 1 or n_cap < 1:
                                continue
                            cand = _best_over_n_a(shape, curves, hw_a, hw_e, tp_a, tp_e, g,
                                                  nodes, m, b_max, n_cap, slo_s, seq_len)
                            if cand[1] is not None:
                                fastest = min(fastest, cand[1])
                            plan = cand[0]
                            if plan and (best is None or plan.tokens_per_s_per_cost
                                         > best.tokens_per_s_per_cost):
                                best = plan
    names_a = ",".join(h.name for h in attention_gpus)
    names_e = ",".join(h.name for h in expert_gpus)
    if not fits_e:
        raise UserError(f"model {shape.name} does not fit: one expert needs "
                        f"{BYTES * shape.expert_params / 1e9:.1f} GB, more than 8 x {names_e}")
    if not fits_a:
        raise UserError(f"model {shape.name} does not fit: attention weights need "
                        f"{BYTES * shape.attn_params / 1e9:.1f} GB plus KV cache, more than "
                        f"8 x {names_a}")
    if best is None:
        if max_gpus is not None and fastest == float("inf"):
            raise UserError(f"no plan for {shape.name} fits in {max_gpus} GPUs")
        raise UserError(f"no plan meets the {slo_s * 1e3:g} ms TBT SLO for {shape.name} on "
                        f"{names_a}/{names_e}; the fastest needs {fastest * 1e3:.1f} ms")
    if with_colocated:
        best = _with_colocated(best, shape, list(attention_gpus) + list(expert_gpus), slo_s,
                               seq_len)
    return best


def _best_over_n_a(shape: MoEShape, curves: RoleCurves, hw_a: HardwareSpec, hw_e: HardwareSpec,
                   tp_a: int, tp_e: int, g: int, nodes: int, m: int, b_max: int, n_cap: int,
                   slo_s: float, seq_len: int) -> tuple[Plan | None, float | None]:
    """BALANCE + binary search for one (GPU types, tp_a, tp_e, g_e, m)."""
    k1, k2 = curves.attention.fit()
    k3, k4 = curves.expert.fit()
    cost_e = tp_e * nodes * hw_e.price
    best: Plan | None = None
    best_obj = -1.0
    fastest: float | None = None

    def plan_for(n_a: int) -> Plan | None:
        nonlocal fastest

        def fn(b: float) -> Estimate:
            return estimate(shape, curves, hw_a, hw_e, tp_a, tp_e, n_a, m, b, g)

        t1 = fn(1).t_total
        fastest = t1 if fastest is None else min(fastest, t1)
        est = _largest_b_a(fn, b_max, slo_s)
        if est is None:
            return None
        return Plan(shape.name, hw_a.name, hw_e.name, tp_a, tp_e, n_a, g, nodes, m, est,
                    hw_a.price, hw_e.price, (k1, k2, k3, k4), seq_len)

    grid = _n_a_grid(n_cap)
    tried: dict[int, Plan | None] = {}
    for n_a in grid:
        plan = tried[n_a] = plan_for(n_a)
        if plan is None:
            break  # larger n_a only slows every iteration further
        obj = plan.est.tokens_per_s / (tp_a * n_a * hw_a.price + cost_e)
        if obj > best_obj:
            best, best_obj = plan, obj
    if best is not None:  # refine between the grid neighbours of the best point
        i = grid.index(best.n_a)
        lo = grid[i - 1] if i > 0 else 1
        hi = grid[i + 1] if i + 1 < len(grid) else best.n_a
        for n_a in range(lo + 1, hi):
            if n_a in tried:
                continue
            plan = plan_for(n_a)
            if plan is None:
                continue
            obj = plan.est.tokens_per_s / (tp_a * n_a * hw_a.price + cost_e)
            if obj > best_obj:
                best, best_obj = plan, obj
    return best, fastest


def _with_colocated(plan: Plan, shape: MoEShape, gpus: Sequence[HardwareSpec], slo_s: float,
                    seq_len: int) -> Plan:
    """Attach the colocated baseline: the offered GPU type whose best colocated configuration
    has the highest tokens/s per cost; both reported ratios compare against it."""
    best: ColocatedPlan | None = None
    seen = set()
    for hw in gpus:
        if hw.name in seen:
            continue
        seen.add(hw.name)
        col = search_colocated(shape, hw, slo_s, seq_len)
        if col and (best is None or col.tokens_per_s_per_cost > best.tokens_per_s_per_cost):
            best = col
    return Plan(**{**plan.__dict__, "colocated": best})


def estimate_with_m(plan: Plan, shape: MoEShape, hw_a: HardwareSpec, hw_e: HardwareSpec, m: int,
                    profiles: Sequence[HardwareProfile] = ()) -> Estimate:
    """Re-estimate ``plan`` with ``m`` micro-batches at the same global batch and ``n_a`` (the
    KV cache bounds ``m·b_a``, so memory fixes the batch): the paper's m ablation."""
    attn_curve, exp_curve = curve_source(profiles)
    curves = RoleCurves(attn_curve(shape, hw_a, plan.tp_a, plan.seq_len),
                        exp_curve(shape, hw_e, plan.tp_e, plan.experts_per_node))
    b_a = plan.est.batch / plan.n_a / m
    return estimate(shape, curves, hw_a, hw_e, plan.tp_a, plan.tp_e, plan.n_a, m, b_a,
                    plan.experts_per_node)
