"""Which expert node serves each routed (token, k): the placement and the replica choice.

A :class:`Placement` says which node hosts which experts; an expert may be hosted by several
nodes (replicas). :meth:`Routes.split` picks, for every routed ``(token, k)``, replica
``(token + offset) % live_replicas`` among the nodes not marked down, where the caller moves
``offset`` with the step and layer: deterministic, and it spreads a replicated expert's rows
evenly even when micro-batches are a single token. When a node is marked down (its link broke
or it stopped replying), its experts are served by their other replicas; an expert with no live
replica left makes it raise :class:`ExpertUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ExpertUnavailable(RuntimeError):
    """An expert node failed, refused a dispatch, or did not reply within the bound, and no
    other replica could take its rows."""


class StalePlacement(ExpertUnavailable):
    """An expert node refused a dispatch routed by placement ``epoch``: the node is at a
    newer one, which this replica has not adopted yet (it will: pushed or polled)."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


@dataclass(frozen=True)
class ExpertNodeRoute:
    """Where one expert node listens for dispatches and which experts it hosts."""

    node_id: str
    dispatch_url: str
    expert_ids: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """The expert placement an attention replica routes by (validated at construction)."""

    epoch: int
    nodes: tuple[ExpertNodeRoute, ...]
    num_experts: int

    def __post_init__(self) -> None:
        hosted = {e for n in self.nodes for e in n.expert_ids}
        missing = sorted(set(range(self.num_experts)) - hosted)
        if missing:
            raise ValueError(f"placement epoch {self.epoch} hosts no replica of experts {missing}")
        bad = sorted(e for e in hosted if not 0 <= e < self.num_experts)
        if bad:
            raise ValueError(f"placement names expert ids {bad} outside [0, {self.num_experts})")

    def replica_table(self, down: frozenset[int] = frozenset()
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``table [E, R]`` node index of each live replica (padded with -1), ``count [E]``
        (0 for an expert whose every replica is in ``down``, a set of node indices)."""
        per_expert: list[list[int]] = [[] for _ in range(self.num_experts)]
        for ni, node in enumerate(self.nodes):
            if ni not in down:
                for e in node.expert_ids:
                    per_expert[e].append(ni)
        width = max(1, max(len(r) for r in per_expert))
        table = torch.full((self.num_experts, width), -1, dtype=torch.int64)
        for e, r in enumerate(per_expert):
            table[e, : len(r)] = torch.tensor(r, dtype=torch.int64)
        return table, torch.tensor([len(r) for r in per_expert], dtype=torch.int64)


Part = tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor]
"""(node index, row ids into the routed rows or None for all of them, ids [n, K], weights
[n, K]): what one node is sent. A (row, k) served by another node has id -1 and weight 0."""


class Routes:
    """The replica tables of one placement with some nodes marked down (built when either
    changes, used on every dispatch)."""

    def __init__(self, placement: Placement, down: dict[int, str],
                 device: str | torch.device = "cpu") -> None:
        """``down``: node index -> why it is considered down; ``device``: where the routed ids
        live (the tables are indexed by them)."""
        self.down = frozenset(down)
        self.live = [ni for ni in range(len(placement.nodes)) if ni not in down]
        table, count = placement.replica_table(self.down)
        self.table, self.count = table.to(device), count.to(device)
        self.complete = bool((self.count > 0).all())
        self.why = "; ".join(f"expert node {placement.nodes[ni].node_id} is down ({why})"
                             for ni, why in sorted(down.items()))

    def split(self, ids: torch.Tensor, weights: torch.Tensor, offset: int = 0,
              partial: bool = False) -> list[Part]:
        """Split routed rows by serving node.

        ids/weights [T, K]; ``offset`` rotates the replica choice (module docstring);
        ``partial``: ids may hold -1 (nothing to compute; a part being
        re-sent). Raises :class:`ExpertUnavailable` when a routed expert has no live replica.
        """
        valid = ids >= 0 if partial else None
        safe = ids.clamp(min=0) if partial else ids
        if not self.complete:
            lacking = self.count[safe] == 0
            if valid is not None:
                lacking &= valid
            # A host sync, only while a node is down: whether the step can go on at all.
            if bool(lacking.any()):
                experts = torch.unique(ids[lacking]).tolist()
                raise ExpertUnavailable(f"experts {experts} have no live replica: {self.why}")
        if len(self.live) == 1:  # one node serves everything: no selection at all
            return [(self.live[0], None, ids, weights)]
        token = torch.arange(offset, offset + ids.shape[0], device=ids.device)[:, None]  # [T,1]
        count = self.count[safe] if self.complete else self.count[safe].clamp(min=1)
        replica = token % count                                            # [T, K]
        owner = self.table[safe, replica]                                  # [T, K] node index
        if valid is not None:
            owner = torch.where(valid, owner, -1)
        out: list[Part] = []
        for ni in self.live:
            mine = owner == ni                                              # [T, K]
            # nonzero syncs with the device: each node's message size must be known on the
            # host to send it (one node serving everything, above, needs no sync).
            row_ids = mine.any(dim=1).nonzero().squeeze(1)                 # [n]
            if row_ids.numel() == 0:
                continue
            sel = mine.index_select(0, row_ids)
            out.append((ni, row_ids, torch.where(sel, ids.index_select(0, row_ids), -1),
                        torch.where(sel, weights.index_select(0, row_ids), 0.0)))
        return out
