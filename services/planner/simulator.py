"""A discrete-event simulator of the ping-pong pipeline.

It replays one (or several) decode iterations job by job: ``n_a`` attention replicas, each with
``m`` micro-batches, send every micro-batch of every layer to the expert nodes over their
dispatch link, the expert nodes run it once all replicas' parts have arrived (the paper's
synchronous M2N step), and each expert node sends the result back over its combine link; the
micro-batch's next layer is ready when every expert node's result is back.

Every replica, expert node and link is a FIFO resource (one job at a time, served in order of
readiness). Per-replica and per-node durations may differ (stragglers, skewed expert load),
which the closed form cannot express. With equal durations the simulated iteration time equals
:func:`perf_model.iteration_time` exactly; the tests check that.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from services.errors import ConfigError

_ATTN, _EXPERT = 0, 1


@dataclass(frozen=True)
class SimResult:
    """What one simulation measured (seconds, fractions of the makespan)."""

    iteration_time: float  # makespan / iterations: the time between tokens
    makespan: float
    tokens_per_s: float  # batch·iterations / makespan (0 when no batch given)
    util_attention: float  # mean busy fraction over replicas
    util_expert: float  # mean busy fraction over expert nodes
    util_dispatch_link: float
    util_combine_link: float
    jobs: int


def _per(value: float | Sequence[float], n: int, what: str) -> list[float]:
    values = [float(value)] * n if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != n:
        raise ConfigError(f"simulator: {what} has {len(values)} entries, expected {n}")
    if any(v < 0 for v in values):
        raise ConfigError(f"simulator: {what} durations must be >= 0")
    return values


def simulate(layers: int, m: int, t_a: float | Sequence[float], t_e: float | Sequence[float],
             t_c: float, n_attention: int = 1, n_expert: int = 1, batch: float = 0.0,
             iterations: int = 1) -> SimResult:
    """Simulate ``iterations`` decode iterations of ``layers`` layers.

    ``t_a`` is the per-micro-batch per-layer attention time (one value, or one per replica),
    ``t_e`` the expert node time (one value, or one per node), ``t_c`` one link transfer.
    """
    if layers < 1 or m < 1 or n_attention < 1 or n_expert < 1 or iterations < 1:
        raise ConfigError("simulator: layers, m, n_attention, n_expert, iterations must be >= 1")
    if t_c < 0:
        raise ConfigError("simulator: t_c must be >= 0")
    ta = _per(t_a, n_attention, "t_a")
    te = _per(t_e, n_expert, "t_e")
    stages = layers * iterations  # consecutive iterations just continue the layer chain

    a_free = [0.0] * n_attention
    a_busy = [0.0] * n_attention
    send_free = [0.0] * n_attention
    e_free = [0.0] * n_expert
    e_busy = [0.0] * n_expert
    back_free = [0.0] * n_expert
    arrived: dict[tuple[int, int], list[float]] = {}  # (layer, mb) -> [count, latest arrival]
    finish = 0.0
    jobs = 0

    # (ready time, layer, micro-batch, kind, replica): pops in readiness order, ties by position
    # in the pipeline, so each resource serves FIFO.
    heap: list[tuple[float, int, int, int, int]] = [
        (0.0, 0, i, _ATTN, r) for r in range(n_attention) for i in range(m)
    ]
    heapq.heapify(heap)
    while heap:
        ready, layer, mb, kind, r = heapq.heappop(heap)
        jobs += 1
        if kind == _ATTN:
            start = max(ready, a_free[r])
            end = start + ta[r]
            a_free[r] = end
            a_busy[r] += ta[r]
            sent = max(end, send_free[r]) + t_c  # the replica's dispatch link
            send_free[r] = sent
            slot = arrived.setdefault((layer, mb), [0, 0.0])
            slot[0] += 1
            slot[1] = max(slot[1], sent)
            if slot[0] == n_attention:
                del arrived[(layer, mb)]
                heapq.heappush(heap, (slot[1], layer, mb, _EXPERT, 0))
        else:
            back = 0.0
            for e in range(n_expert):
                start = max(ready, e_free[e])
                end = start + te[e]
                e_free[e] = end
                e_busy[e] += te[e]
                done = max(end, back_free[e]) + t_c  # the node's combine link
                back_free[e] = done
                back = max(back, done)
            if layer + 1 < stages:
                for rr in range(n_attention):
                    heapq.heappush(heap, (back, layer + 1, mb, _ATTN, rr))
            else:
                finish = max(finish, back)

    busy_links = stages * m * t_c
    return SimResult(
        iteration_time=finish / iterations,
        makespan=finish,
        tokens_per_s=batch * iterations / finish if finish > 0 else 0.0,
        util_attention=sum(a_busy) / n_attention / finish if finish else 0.0,
        util_expert=sum(e_busy) / n_expert / finish if finish else 0.0,
        util_dispatch_link=busy_links / finish if finish else 0.0,
        util_combine_link=busy_links / finish if finish else 0.0,
        jobs=jobs,
    )
