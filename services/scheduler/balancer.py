"""PickReplica: choose the attention replica for a new request from the Redis load reports.

Load reports arrive with heartbeats (every lease/3), so between two reports a burst of new
requests would all see the same "least loaded" replica. The :class:`Balancer` therefore counts
the requests it sent to each replica since that replica's last report and adds them to the
reported ``running + waiting``. Order: fewest (running + waiting + picked since report), then
lowest KV usage, then node id (deterministic).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from megascale.v1 import common_pb2
from services.scheduler.state import NodeRecord


class NoReplica(Exception):
    """No healthy attention replica qualifies (UNAVAILABLE); the message says why."""


class AllFull(Exception):
    """Every candidate reports too few free KV blocks for the prompt (RESOURCE_EXHAUSTED)."""


def _fits(rec: NodeRecord, prompt_tokens: int) -> bool:
    """Whether the replica's free KV blocks (last report) hold the prompt."""
    if rec.load is None or rec.load.reported_at_unix_s == 0 or prompt_tokens == 0:
        return True  # nothing reported yet: assume it has room
    return rec.load.free_kv_blocks * max(1, rec.info.kv_block_size) >= prompt_tokens


class Balancer:
    """Least-loaded replica choice with the picks-since-last-report correction."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}

    def on_report(self, node_id: str) -> None:
        """A fresh load report arrived: it already counts the requests we sent."""
        self.pending.pop(node_id, None)

    def forget(self, keep: Collection[str]) -> None:
        """Drop counters of nodes that left."""
        for n in [n for n in self.pending if n not in keep]:
            del self.pending[n]

    def pick(self, records: Sequence[NodeRecord], *, exclude: Collection[str] = (),
             prompt_tokens: int = 0, model: str = "") -> NodeRecord:
        """The least-loaded qualifying attention replica; raises NoReplica / AllFull."""
        att = [r for r in records if r.info.role == common_pb2.NODE_ROLE_ATTENTION]
        if not att:
            raise NoReplica("no attention replica is registered")
        if model:
            att = [r for r in att if not r.info.model or r.info.model == model]
            if not att:
                raise NoReplica(f"no attention replica serves model {model!r}")
        excluded = set(exclude)
        cands = [r for r in att if r.info.node_id not in excluded]
        if not cands:
            raise NoReplica(f"all {len(att)} attention replicas are excluded")
        fitting = [r for r in cands if _fits(r, prompt_tokens)]
        if not fitting:
            raise AllFull(f"no attention replica has free KV blocks for a "
                          f"{prompt_tokens}-token prompt ({len(cands)} candidates)")

        def score(r: NodeRecord) -> tuple[int, float, str]:
            busy = (r.load.running + r.load.waiting) if r.load is not None else 0
            kv = r.load.kv_usage if r.load is not None else 0.0
            return busy + self.pending.get(r.info.node_id, 0), kv, r.info.node_id

        best = min(fitting, key=score)
        self.pending[best.info.node_id] = self.pending.get(best.info.node_id, 0) + 1
        return best
