"""The expert placement algorithm: which expert node serves which expert id.

Capacity model. A fixed expert node loads its set of experts at start (``--experts``; sent as
``NodeInfo.expert_ids``), so the placement can only *choose among the nodes that already hold
an expert*: a replica of expert ``e`` can only be placed on a node holding ``e``
(:func:`plan_placement`, below). An elastic node (``--experts auto``) may be given any expert
and loads it on demand; with elastic nodes, or ``--expert-replicas`` above 1,
:func:`plan_copies` places a fixed number of copies of every expert instead.

Load model. ``expert_load[e]`` is the rows expert ``e`` computes per unit time (from
``Expert.GetStats`` deltas; uniform when unknown). Senders balance an expert's rows evenly over
its hosts, so a node's load is ``sum(load[e] / len(hosts[e]))`` over the experts it hosts.

Algorithm (greedy min-max):
1. Every expert that has a live holder gets exactly one host: experts in decreasing load
   order (LPT), each to the candidate node with the least load so far (ties: fewer experts,
   then node id). Experts nobody holds are reported in ``missing``.
2. Up to ``replicate_hot`` extra replicas: take the expert with the highest load per host,
   add the least-loaded candidate that does not host it yet, and keep the replica only if the
   new host ends below the most loaded of the expert's current hosts (so the max node load
   never rises); otherwise try the next hottest expert; stop when none helps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megascale.v1 import common_pb2


@dataclass(frozen=True)
class ExpertNode:
    """A live expert node as placement sees it: the experts it holds and where it receives."""

    node_id: str
    m2n_url: str
    expert_ids: tuple[int, ...]
    grpc_address: str = ""  # where replicas that have not attached yet call Expert.Attach
    started_at: float = 0.0  # its process's start (NodeInfo.started_at_unix_s): a restart
    elastic: bool = False    # --experts auto: may be assigned any expert (loads it on demand)

    def can_host(self, expert: int) -> bool:
        return self.elastic or expert in self.expert_ids


@dataclass(frozen=True)
class PlacementPlan:
    """``hosts[e]``: node ids serving expert ``e`` (sorted; empty when ``e`` is missing)."""

    num_experts: int
    hosts: tuple[tuple[str, ...], ...]
    node_load: tuple[tuple[str, float], ...]  # (node id, load) for every candidate node
    missing: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def max_load(self) -> float:
        return max((v for _, v in self.node_load), default=0.0)

    @property
    def mean_load(self) -> float:
        return sum(v for _, v in self.node_load) / len(self.node_load) if self.node_load else 0.0

    @property
    def replicas(self) -> int:
        """Hosts beyond the first, over all experts."""
        return sum(max(0, len(h) - 1) for h in self.hosts)


def normalise_load(num_experts: int, expert_load: Mapping[int, float] | Sequence[float] | None
                   ) -> list[float]:
    """Per-expert load as a list; uniform 1.0 when unknown or all zero."""
    if expert_load is None:
        return [1.0] * num_experts
    if isinstance(expert_load, Mapping):
        out = [float(expert_load.get(e, 0.0)) for e in range(num_experts)]
    else:
        out = [float(x) for x in expert_load][:num_experts]
        out += [0.0] * (num_experts - len(out))
    out = [max(0.0, x) for x in out]
    return out if sum(out) > 0 else [1.0] * num_experts


def node_loads(hosts: Sequence[Sequence[str]], load: Sequence[float],
               node_ids: Sequence[str]) -> dict[str, float]:
    """Each node's load under the even-split model (module docstring)."""
    out = dict.fromkeys(node_ids, 0.0)
    for e, hs in enumerate(hosts):
        for h in hs:
            out[h] = out.get(h, 0.0) + load[e] / len(hs)
    return out


def plan_placement(num_experts: int, nodes: Sequence[ExpertNode],
                   expert_load: Mapping[int, float] | Sequence[float] | None = None,
                   replicate_hot: int = 0) -> PlacementPlan:
    """Greedy min-max placement (module docstring). Deterministic for the same input."""
    load = normalise_load(num_experts, expert_load)
    candidates: list[list[str]] = [[] for _ in range(num_experts)]
    for node in sorted(nodes, key=lambda n: n.node_id):
        for e in set(node.expert_ids):
            if 0 <= e < num_experts:
                candidates[e].append(node.node_id)
    node_ids = sorted({n.node_id for n in nodes})
    cur = dict.fromkeys(node_ids, 0.0)
    count = dict.fromkeys(node_ids, 0)
    hosts: list[list[str]] = [[] for _ in range(num_experts)]
    # 1. LPT: heaviest expert first, onto the least-loaded candidate.
    for e in sorted(range(num_experts), key=lambda e: (-load[e], e)):
        if not candidates[e]:
            continue
        best = min(candidates[e], key=lambda n: (cur[n], count[n], n))
        hosts[e].append(best)
        cur[best] += load[e]
        count[best] += 1
    # 2. Replicas of hot experts on the least-loaded nodes that hold them.
    budget = replicate_hot
    while budget > 0:
        order = sorted((e for e in range(num_experts) if hosts[e] and load[e] > 0),
                       key=lambda e: (-load[e] / len(hosts[e]), e))
        for e in order:
            spare = [n for n in candidates[e] if n not in hosts[e]]
            if not spare:
                continue
            target = min(spare, key=lambda n: (cur[n], count[n], n))
            k = len(hosts[e])
            share_old, share_new = load[e] / k, load[e] / (k + 1)
            if cur[target] + share_new < max(cur[h] for h in hosts[e]):
                for h in hosts[e]:
                    cur[h] += share_new - share_old
                hosts[e].append(target)
                cur[target] += share_new
                count[target] += 1
                budget -= 1
                break
        else:
            break  # no replica lowers the max any more
    missing = tuple(e for e in range(num_experts) if not hosts[e])
    final = node_loads(hosts, load, node_ids)  # recomputed: no float drift from the updates
    return PlacementPlan(num_experts, tuple(tuple(sorted(h)) for h in hosts),
                         tuple(sorted(final.items())), missing)


def plan_copies(num_experts: int, nodes: Sequence[ExpertNode], copies: int,
                previous: Sequence[Sequence[str]] = ()) -> PlacementPlan:
    """``copies`` hosts per expert on distinct nodes (fewer where fewer nodes can host it),
    spread evenly, moving as little as possible from ``previous`` (hosts per expert of the
    placement in force). Deterministic for the same input.

    1. Keep each expert's previous hosts that can still host it, while the host stays under
       the even share ``ceil(sum(copies per expert) / nodes)`` (a node that joined gets the
       excess of the others).
    2. Give each expert its missing copies on the nodes that host the fewest experts so far
       (ties: node id). Elastic nodes can host any expert, fixed nodes their own.
    """
    ordered = sorted(nodes, key=lambda n: n.node_id)
    node_ids = [n.node_id for n in ordered]
    candidates = [[n.node_id for n in ordered if n.can_host(e)] for e in range(num_experts)]
    want = [min(copies, len(c)) for c in candidates]
    share = -(-sum(want) // len(node_ids)) if node_ids else 0
    count = dict.fromkeys(node_ids, 0)
    hosts: list[list[str]] = [[] for _ in range(num_experts)]
    for e in range(min(num_experts, len(previous))):
        for n in previous[e]:
            if n in candidates[e] and len(hosts[e]) < want[e] and count[n] < share:
                hosts[e].append(n)
                count[n] += 1
    for e in range(num_experts):
        while len(hosts[e]) < want[e]:
            best = min((n for n in candidates[e] if n not in hosts[e]),
                       key=lambda n: (count[n], n))
            hosts[e].append(best)
            count[best] += 1
    load = normalise_load(num_experts, None)
    final = node_loads(hosts, load, node_ids)
    missing = tuple(e for e in range(num_experts) if not hosts[e])
    return PlacementPlan(num_experts, tuple(tuple(sorted(h)) for h in hosts),
                         tuple(sorted(final.items())), missing)


def assigned(plan: PlacementPlan, node_id: str) -> tuple[int, ...]:
    """The expert ids ``plan`` places on ``node_id``."""
    return tuple(e for e, hs in enumerate(plan.hosts) if node_id in hs)


def naive_placement(num_experts: int, nodes: Sequence[ExpertNode]) -> list[tuple[str, ...]]:
    """Baseline for tests and benchmarks: each expert on the first node (by id) holding it."""
    out: list[tuple[str, ...]] = [() for _ in range(num_experts)]
    for node in sorted(nodes, key=lambda n: n.node_id):
        for e in node.expert_ids:
            if 0 <= e < num_experts and not out[e]:
                out[e] = (node.node_id,)
    return out


def plan_load(plan_hosts: Sequence[Sequence[str]], expert_load: Mapping[int, float]
              | Sequence[float] | None, node_ids: Sequence[str]) -> float:
    """The max node load of ``plan_hosts`` under ``expert_load`` (to compare plans)."""
    load = normalise_load(len(plan_hosts), expert_load)
    return max(node_loads(plan_hosts, load, node_ids).values(), default=0.0)


def to_proto(plan: PlacementPlan, epoch: int, urls: Mapping[str, str],
             addresses: Mapping[str, str] | None = None,
             started: Mapping[str, float] | None = None) -> common_pb2.ExpertPlacement:
    """The wire table: one ExpertReplicas per expert id, in id order (``urls``: node -> m2n
    URL, ``addresses``: node -> gRPC address, ``started``: node -> its process's start)."""
    addresses, started = addresses or {}, started or {}
    return common_pb2.ExpertPlacement(
        epoch=epoch, num_experts=plan.num_experts,
        experts=[common_pb2.ExpertReplicas(
            expert_id=e, hosts=[common_pb2.ExpertHost(node_id=n, m2n_url=urls.get(n, ""),
                                                      grpc_address=addresses.get(n, ""),
                                                      started_at_unix_s=started.get(n, 0.0))
                                for n in hs])
                 for e, hs in enumerate(plan.hosts)])


def hosts_from_proto(p: common_pb2.ExpertPlacement) -> tuple[tuple[str, ...], ...]:
    """``hosts[e]`` of a wire table (sorted node ids), to compare it with a new plan."""
    out: list[tuple[str, ...]] = [() for _ in range(p.num_experts)]
    for rep in p.experts:
        if rep.expert_id < p.num_experts:
            out[rep.expert_id] = tuple(sorted(h.node_id for h in rep.hosts))
    return tuple(out)
