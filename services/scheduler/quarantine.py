"""Quarantine of expert nodes whose lease holds but whose data path fails.

A lease proves only a node's control plane (its heartbeats reach the scheduler). Attention
replicas find out about its data path: a replica that cannot reach a node, or gets no reply
within its timeout, routes that node's experts to their other replicas and names the node in
``LoadReport.expert_nodes_down`` (services/attention/dispatch.py). The replicas re-admit such a
node on their own after a while, so a node that stays broken is tried, timed out and routed
around again and again, each time costing the requests in flight a timeout.

Policy (:class:`Quarantine`):

* A live expert node is *suspect* while more than half of the live attention replicas that
  report load name it down.
* A node suspect for ``after_s`` without a break is *quarantined*: the placement is planned
  without it, so no replica sends it anything. Only when the other live, unquarantined nodes
  still hold every expert: a quarantine must never leave an expert without a host.
* It is released after a hold, and is then planned in again and must be suspect for another
  ``after_s`` before it is quarantined again. The hold doubles with each quarantine
  (``hold_s``, ``2 hold_s``, ... up to ``max_hold_s``) so a flapping node spends most of its time
  out; a node that stays clean for ``max_hold_s`` after a release starts again from ``hold_s``.

Plain state over the records the controller already reads; no I/O. What must outlive a
scheduler restart (deadlines, strikes, release times) is :meth:`Quarantine.export`-ed on the
wall clock and stored in Redis by the controller, which hands it to :meth:`Quarantine.adopt` at
start; suspicion is not kept (the replicas' reports rebuild it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megascale.v1 import common_pb2
from services.scheduler.state import NodeRecord

log = logging.getLogger("megascale.scheduler.quarantine")


@dataclass
class _Node:
    suspect_since: float | None = None
    until: float | None = None       # quarantined until then
    strikes: int = 0                 # quarantines so far (the next hold is hold_s * 2**strikes)
    released_at: float | None = None


class Quarantine:
    """Which expert nodes to leave out of the placement (module docstring)."""

    def __init__(self, num_experts: int, after_s: float, hold_s: float, max_hold_s: float
                 ) -> None:
        self.num_experts = num_experts
        self.after_s = after_s
        self.hold_s = hold_s
        self.max_hold_s = max_hold_s
        self._nodes: dict[str, _Node] = {}
        self.total = 0  # quarantines started since this scheduler began
        self.changes = 0  # bumped whenever what export() returns changes (not the clocks)

    @property
    def enabled(self) -> bool:
        return self.after_s > 0

    def update(self, records: Sequence[NodeRecord], now: float) -> frozenset[str]:
        """Advance the policy to ``now`` over the live nodes; returns the quarantined ids."""
        experts = {r.info.node_id: r for r in records
                   if r.info.role == common_pb2.NODE_ROLE_EXPERT}
        for node_id in [n for n in self._nodes if n not in experts]:
            st = self._nodes.pop(node_id)  # left: a node that comes back starts clean
            self.changes += st.until is not None or st.strikes > 0
        if not self.enabled:
            return frozenset()
        reports = [r.load for r in records
                   if r.info.role == common_pb2.NODE_ROLE_ATTENTION and r.load is not None]
        for node_id in experts:
            st = self._nodes.setdefault(node_id, _Node())
            if st.until is not None:
                if now < st.until:
                    continue
                log.info("expert node %s released from quarantine", node_id)
                st.until, st.suspect_since, st.released_at = None, None, now
                self.changes += 1
            if st.released_at is not None and now - st.released_at >= self.max_hold_s:
                st.strikes, st.released_at = 0, None  # clean for long enough: forgiven
                self.changes += 1
            down = sum(node_id in x.expert_nodes_down for x in reports)
            if not reports or 2 * down <= len(reports):
                st.suspect_since = None
                continue
            if st.suspect_since is None:
                st.suspect_since = now
            if now - st.suspect_since >= self.after_s and self._others_cover(node_id, experts):
                hold = min(self.max_hold_s, self.hold_s * 2 ** st.strikes)
                st.until, st.strikes, st.released_at = now + hold, st.strikes + 1, None
                self.total += 1
                self.changes += 1
                log.warning("expert node %s quarantined for %.0f s: %d of %d attention "
                            "replicas route around it while its lease holds", node_id, hold,
                            down, len(reports))
        return self.quarantined()

    def export(self, now: float, wall: float) -> dict[str, dict]:
        """Each node's deadline, strikes and release time, with the times on the wall clock
        (``now`` is the monotonic time ``update`` runs on, ``wall`` the matching
        ``time.time()``): a new scheduler process has a different monotonic clock."""
        def to_wall(t: float | None) -> float | None:
            return None if t is None else round(wall + (t - now), 3)

        return {n: {"until": to_wall(st.until), "strikes": st.strikes,
                    "released_at": to_wall(st.released_at)}
                for n, st in self._nodes.items() if st.until is not None or st.strikes}

    def adopt(self, saved: dict[str, dict], now: float, wall: float) -> None:
        """Take over what a previous scheduler exported (entries that do not parse are
        skipped with a warning: they come from Redis)."""
        def to_mono(t: Any) -> float | None:
            return None if t is None else now + (float(t) - wall)

        for node_id, d in saved.items():
            try:
                strikes = int(d.get("strikes", 0))
                if strikes < 0:
                    raise ValueError(strikes)
                st = _Node(until=to_mono(d.get("until")), strikes=strikes,
                           released_at=to_mono(d.get("released_at")))
            except (AttributeError, TypeError, ValueError):
                log.warning("ignoring unreadable quarantine state of %r", node_id)
                continue
            self._nodes[str(node_id)] = st
            if st.until is not None:
                log.info("expert node %s stays quarantined for %.0f s (from the previous "
                         "scheduler)", node_id, max(0.0, st.until - now))
        self.changes += 1

    def quarantined(self) -> frozenset[str]:
        return frozenset(n for n, st in self._nodes.items() if st.until is not None)

    def _others_cover(self, node_id: str, experts: dict[str, NodeRecord]) -> bool:
        """Whether the live nodes other than ``node_id`` and those already quarantined hold
        every expert (so the placement stays complete without it)."""
        out = self.quarantined() | {node_id}
        held = {e for n, r in experts.items() if n not in out for e in r.info.expert_ids}
        return held >= set(range(self.num_experts))
