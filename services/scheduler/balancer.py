"""PickReplica: choose the attention replica for a new request from the Redis load reports.

Load reports arrive with heartbeats (every lease/3), so between two reports a burst of new
requests would all see the same "least loaded" replica. The :class:`Balancer` therefore counts
the requests it sent to each replica since that replica's last report and adds them to the
reported ``running + waiting``. Order: fewest (running + waiting + picked since report), then
lowest KV usage, then node id (deterministic).

**Cache-aware routing.** Replicas cache the KV blocks of prompt prefixes they have seen
(services/attention/prefix_cache.py), so a request whose prompt starts like an earlier one is
cheaper on the replica that served it. The gateway sends the prompt's chained block hashes
(``prefix_hashes``); the balancer keeps, per replica, an approximate LRU set of the hashes it
routed there (:class:`PrefixMap`: what it sent, not what the replica still holds; bounded,
forgotten when the replica leaves). Among the replicas whose load is within
``PREFIX_SLACK`` requests of the least loaded, the one holding the longest run of the
prompt's leading hashes wins; with no match anywhere, or all matching replicas too busy, the
least-loaded rule decides. Like SGLang's router: affinity while the load is balanced, load
first when it is not.
"""

from __future__ import annotations

from collections import OrderedDict
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


PREFIX_SLACK = 4            # requests of extra load a prefix match may cost at most
PREFIX_MAP_BLOCKS = 1 << 16  # hashes remembered per replica (LRU beyond)


class PrefixMap:
    """Per replica, the prompt block hashes routed there lately (an approximate LRU)."""

    def __init__(self, capacity: int = PREFIX_MAP_BLOCKS) -> None:
        self.capacity = capacity
        self.by_node: dict[str, OrderedDict[int, None]] = {}

    def match(self, node_id: str, hashes: Sequence[int]) -> int:
        """How many leading ``hashes`` were routed to ``node_id``."""
        seen = self.by_node.get(node_id)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def record(self, node_id: str, hashes: Sequence[int]) -> None:
        seen = self.by_node.setdefault(node_id, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, keep: Collection[str]) -> None:
        for n in [n for n in self.by_node if n not in keep]:
            del self.by_node[n]

    def forget_node(self, node_id: str) -> None:
        self.by_node.pop(node_id, None)


class Balancer:
    """Least-loaded replica choice with the picks-since-last-report correction, and prefix
    affinity while loads are balanced (module docstring)."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.prefixes = PrefixMap()
        self.prefix_routed = 0  # picks decided by a prefix match

    def on_report(self, node_id: str) -> None:
        """A fresh load report arrived: it already counts the requests we sent."""
        self.pending.pop(node_id, None)

    def forget(self, keep: Collection[str]) -> None:
        """Drop counters of nodes that left."""
        for n in [n for n in self.pending if n not in keep]:
            del self.pending[n]
        self.prefixes.forget(keep)

    def pick(self, records: Sequence[NodeRecord], *, exclude: Collection[str] = (),
             prompt_tokens: int = 0, model: str = "", prefix_hashes: Sequence[int] = ()
             ) -> NodeRecord:
        """The qualifying attention replica to use (module docstring); raises NoReplica /
        AllFull."""
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
        if prefix_hashes:
            near = [r for r in fitting if score(r)[0] <= score(best)[0] + PREFIX_SLACK]
            hits = {r.info.node_id: self.prefixes.match(r.info.node_id, prefix_hashes)
                    for r in near}
            top = max(hits.values())
            if top > 0:
                best = min((r for r in near if hits[r.info.node_id] == top), key=score)
                self.prefix_routed += 1
            self.prefixes.record(best.info.node_id, prefix_hashes)
        self.pending[best.info.node_id] = self.pending.get(best.info.node_id, 0) + 1
        return best
