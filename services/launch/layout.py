"""How ``megascale up`` lays the model out on this machine: colocated or disaggregated.

Disaggregation pays by giving the experts hardware of their own: many attention replicas feed
one set of expert nodes, so each expert's batch grows with the replicas while attention runs
elsewhere, and ping-pong hides the traffic between them (docs/ARCHITECTURE.md §1). When the
experts would run on the *same* cores or the *same* GPU as attention, nothing is gained that
way: the split only adds the M2N traffic, a second process competing for the same compute and
memory bandwidth, and lanes that cut the batch in ``m``. Then one process per replica that
computes its own experts (services/attention/local_experts.py) with every core is faster.

The rule (``--layout auto``):

- expert nodes asked for (``--experts N``, or a flag that places experts on nodes:
  ``--expert-replicas``, ``--elastic-experts``, ``--replicate``) or given devices of their own
  that attention does not use (``--expert-devices`` disjoint from ``--attention-devices``):
  **disaggregated**;
- otherwise (one CPU host, or every role on the same GPUs): **colocated**.

``--layout colocated|disaggregated`` forces either; every layout stays available by flag.
Threads on CPU: the host's cores are split evenly over the compute processes (``--threads``
overrides).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.errors import UserError

__all__ = ["LAYOUTS", "Layout", "choose_layout"]

LAYOUTS = ("auto", "colocated", "disaggregated")
DEFAULT_EXPERT_NODES = 2
DEFAULT_MICRO_BATCHES = 2


@dataclass(frozen=True)
class Layout:
    """What ``megascale up`` starts, and why (``reason`` is printed)."""

    kind: str                 # "colocated" | "disaggregated"
    attention: int            # attention replicas
    experts: int              # expert nodes (0 when colocated)
    micro_batches: int        # lanes per replica
    attention_threads: int
    expert_threads: int
    reason: str

    def __post_init__(self) -> None:
        if self.kind not in ("colocated", "disaggregated"):
            raise ValueError(f"layout kind must be colocated or disaggregated, got {self.kind!r}")
        if (self.kind == "colocated") != (self.experts == 0):
            raise ValueError("a colocated layout has no expert nodes; a disaggregated one has some")

    def describe(self) -> str:
        if self.kind == "colocated":
            what = (f"{self.attention} replica(s) computing their experts in-process, "
                    f"{self.attention_threads} thread(s) each")
        else:
            what = (f"{self.attention} replica(s) x {self.experts} expert node(s), "
                    f"m={self.micro_batches}, {self.attention_threads} / "
                    f"{self.expert_threads} thread(s) per replica / node")
        return f"layout: {self.kind} ({what}): {self.reason}"


def _threads(cpus: int, processes: int, on_cpu: bool, forced: int | None) -> int:
    if forced is not None:
        return forced
    return max(1, cpus // processes) if on_cpu else 1


def choose_layout(layout: str, attention: int, experts: int | None, micro_batches: int | None,
                  attention_devices: list[str], expert_devices: list[str],
                  num_experts: int, threads: int | None = None,
                  cpus: int | None = None, node_flag: str | None = None,
                  min_nodes: int = 1) -> Layout:
    """Resolve ``--layout`` (module docstring). ``experts`` / ``micro_batches`` None: not given
    on the command line. ``node_flag``: a flag given that only expert nodes can honour (it
    implies them under auto); ``min_nodes``: the fewest nodes it needs (expert copies).
    Raises UserError for a combination that cannot be honoured."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    cpus = cpus or os.cpu_count() or 1
    shared = bool(set(attention_devices) & set(expert_devices))
    on_cpu = all(d == "cpu" for d in (*attention_devices, *expert_devices))
    if layout == "auto":
        if experts is not None:
            kind, why = "disaggregated", "expert nodes were asked for (--experts)"
        elif node_flag:
            kind, why = "disaggregated", f"{node_flag} places experts on expert nodes"
        elif not shared:
            kind, why = "disaggregated", ("the expert nodes have devices of their own "
                                          f"({','.join(expert_devices)})")
        else:
            pool = f"the same {cpus} CPU cores" if on_cpu else \
                f"the same device ({','.join(sorted(set(attention_devices)))})"
            kind, why = "colocated", (
                f"attention and experts would share {pool}, so splitting them adds only M2N "
                "traffic and contention; --layout disaggregated forces the split")
    else:
        kind, why = layout, "forced by --layout"
    if kind == "colocated":
        if experts or node_flag:
            raise UserError(f"--layout colocated runs no expert nodes: drop "
                            f"{node_flag or '--experts'}")
        if micro_batches not in (None, 1):
            raise UserError("--layout colocated runs one lane per replica: drop --micro-batches")
        return Layout("colocated", attention, 0, 1,
                      _threads(cpus, attention, on_cpu, threads), 0, why)
    nodes = max(DEFAULT_EXPERT_NODES, min_nodes) if experts is None else experts
    if not 1 <= nodes <= num_experts:
        raise UserError(f"--experts must be in 1..{num_experts} (the model has {num_experts} "
                        f"experts), got {nodes}")
    per = _threads(cpus, attention + nodes, on_cpu, threads)
    return Layout("disaggregated", attention, nodes,
                  micro_batches or DEFAULT_MICRO_BATCHES, per, per, why)
