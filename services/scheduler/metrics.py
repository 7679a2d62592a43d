"""The scheduler's Prometheus metrics: membership, placement and per-role autoscaling signals.

The autoscaling signals (docs/ARCHITECTURE.md §5) are aggregated from the nodes' Heartbeat load
reports on every sweep, so HPA/KEDA read one endpoint instead of scraping every node:

- ``megascale:scheduler_requests_waiting{role}`` / ``..._running`` (sum) and
  ``megascale:scheduler_mean_requests_waiting{role}`` (per node): queue pressure;
- ``megascale:scheduler_kv_usage_mean`` / ``_max``: attention KV pool usage (0..1);
- ``megascale:scheduler_attention_time_ms`` (T_a) vs ``megascale:scheduler_expert_wait_ms``
  (time attention waits for experts) and their ratio ``megascale:scheduler_ta_te_ratio``:
  > 1 means attention is the bottleneck (scale attention), < 1 the experts;
- ``megascale:scheduler_expert_queue_wait_seconds``: expert queue wait estimated with
  Little's law (queued rows / rows per second) averaged over expert nodes. LoadReport has no
  attention-side queue-wait field, so attention queue pressure is the waiting count.

Health: ``megascale:scheduler_expert_node_down_reports{node_id}`` counts the live attention
replicas that route around a live expert node (LoadReport.expert_nodes_down). A lease only
proves the node's control plane; a non-zero value means its data path fails (alert on it).
``megascale:scheduler_expert_nodes_quarantined`` counts the live nodes planned out for that
reason (services/scheduler/quarantine.py); ``megascale:scheduler_expert_quarantines_total``
counts quarantines started.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge

from megascale.v1 import common_pb2
from services.common.metrics import new_registry
from services.scheduler.placement import PlacementPlan
from services.scheduler.state import NodeRecord

ROLE_NAMES = {common_pb2.NODE_ROLE_ATTENTION: "attention", common_pb2.NODE_ROLE_EXPERT: "expert",
              common_pb2.NODE_ROLE_GATEWAY: "gateway",
              common_pb2.NODE_ROLE_SCHEDULER: "scheduler"}


def role_name(role: int) -> str:
    return ROLE_NAMES.get(role, "unknown")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


class SchedulerMetrics:
    """Metric objects on the scheduler's own registry."""

    def __init__(self) -> None:
        self.registry = r = new_registry()
        g = lambda name, doc, labels=(): Gauge(name, doc, list(labels), registry=r)  # noqa: E731
        c = lambda name, doc, labels=(): Counter(name, doc, list(labels), registry=r)  # noqa: E731
        self.nodes = g("megascale:scheduler_nodes", "Live nodes by role", ["role"])
        self.epoch = g("megascale:scheduler_membership_epoch", "Membership epoch")
        self.placement_epoch = g("megascale:scheduler_placement_epoch",
                                 "Epoch of the placement in force")
        self.placement_complete = g("megascale:scheduler_placement_complete",
                                    "1 when every expert has a live host, else 0 (the last "
                                    "complete placement stays in force)")
        self.placement_missing = g("megascale:scheduler_placement_missing_experts",
                                   "Experts with no live host")
        self.placement_max = g("megascale:scheduler_placement_max_load",
                               "Max expert-node load of the placement (rows/s, or experts "
                               "when uniform)")
        self.placement_mean = g("megascale:scheduler_placement_mean_load",
                                "Mean expert-node load of the placement")
        self.placement_replicas = g("megascale:scheduler_placement_replicas",
                                    "Extra replicas of hot experts in the placement")
        self.waiting = g("megascale:scheduler_requests_waiting",
                         "Waiting requests summed over the role's nodes", ["role"])
        self.mean_waiting = g("megascale:scheduler_mean_requests_waiting",
                              "Waiting requests per node", ["role"])
        self.running = g("megascale:scheduler_requests_running",
                         "Running requests summed over the role's nodes", ["role"])
        self.kv_mean = g("megascale:scheduler_kv_usage_mean",
                         "Mean KV cache usage of attention replicas (0..1)")
        self.kv_max = g("megascale:scheduler_kv_usage_max",
                        "Max KV cache usage of attention replicas (0..1)")
        self.t_a = g("megascale:scheduler_attention_time_ms",
                     "Mean attention compute time per step (T_a), ms")
        self.t_e = g("megascale:scheduler_expert_wait_ms",
                     "Mean time per step attention waits for experts, ms")
        self.ta_te = g("megascale:scheduler_ta_te_ratio",
                       "T_a / expert wait (>1: attention-bound, <1: expert-bound; 0 = unknown)")
        self.expert_queue_rows = g("megascale:scheduler_expert_queue_rows",
                                   "Rows queued at expert nodes, summed")
        self.expert_queue_wait = g("megascale:scheduler_expert_queue_wait_seconds",
                                   "Mean expert queue wait, queued rows / rows per second")
        self.down_reports = g("megascale:scheduler_expert_node_down_reports",
                              "Live attention replicas whose last report routes around this "
                              "live expert node (its data path fails while its lease holds)",
                              ["node_id"])
        self._down_labels: set[str] = set()  # node ids with a down_reports series
        self.quarantined = g("megascale:scheduler_expert_nodes_quarantined",
                             "Live expert nodes planned out of the placement because most "
                             "attention replicas route around them")
        self.quarantines = c("megascale:scheduler_expert_quarantines",
                             "Expert nodes put in quarantine (a repeat doubles the hold)")
        self._quarantines_seen = 0
        self.registrations = c("megascale:scheduler_registrations", "Register calls accepted",
                               ["role"])
        self.expirations = c("megascale:scheduler_lease_expirations",
                             "Nodes removed because their lease expired")
        self.deregistrations = c("megascale:scheduler_deregistrations", "Deregister calls")
        self.pushes = c("megascale:scheduler_placement_pushes",
                        "UpdatePlacement calls to nodes", ["result"])
        self.picks = c("megascale:scheduler_pick_replica", "PickReplica answers", ["result"])
        self.prefix_picks = c("megascale:scheduler_prefix_affinity_picks", "PickReplica "
                              "answers decided by the prompt's prefix (cache-aware routing)")
        self.redis_errors = c("megascale:scheduler_redis_errors",
                              "Operations that failed because Redis was unreachable")

    def observe_nodes(self, records: Sequence[NodeRecord]) -> None:
        """Refresh the membership and autoscaling gauges from the live nodes' reports."""
        by_role: dict[str, list[NodeRecord]] = {n: [] for n in ROLE_NAMES.values()}
        for rec in records:
            by_role.setdefault(role_name(rec.info.role), []).append(rec)
        for role, recs in by_role.items():
            self.nodes.labels(role=role).set(len(recs))
            loads = [r.load for r in recs if r.load is not None]
            self.waiting.labels(role=role).set(sum(x.waiting for x in loads))
            self.running.labels(role=role).set(sum(x.running for x in loads))
            self.mean_waiting.labels(role=role).set(_mean([x.waiting for x in loads]))
        att = [r.load for r in by_role["attention"] if r.load is not None]
        self.kv_mean.set(_mean([x.kv_usage for x in att]))
        self.kv_max.set(max((x.kv_usage for x in att), default=0.0))
        t_a = _mean([x.attention_time_ms for x in att])
        t_e = _mean([x.expert_wait_ms for x in att])
        self.t_a.set(t_a)
        self.t_e.set(t_e)
        self.ta_te.set(t_a / t_e if t_e > 0 else 0.0)
        # One series per live expert node (0 = nobody reports it down); departed nodes drop out
        # (removed one by one, so a scrape never sees the live nodes' series missing).
        live = {rec.info.node_id for rec in by_role["expert"]}
        for node_id in live:
            self.down_reports.labels(node_id=node_id).set(
                sum(node_id in x.expert_nodes_down for x in att))
        for node_id in self._down_labels - live:
            self.down_reports.remove(node_id)
        self._down_labels = live
        exp = [r.load for r in by_role["expert"] if r.load is not None]
        self.expert_queue_rows.set(sum(x.expert_queue_rows for x in exp))
        self.expert_queue_wait.set(_mean([x.expert_queue_rows / x.tokens_per_s
                                          for x in exp if x.tokens_per_s > 0]))

    def observe_quarantine(self, quarantined: frozenset[str], total: int) -> None:
        self.quarantined.set(len(quarantined))
        self.quarantines.inc(total - self._quarantines_seen)
        self._quarantines_seen = total

    def observe_placement(self, plan: PlacementPlan, epoch: int) -> None:
        self.placement_complete.set(1 if plan.complete else 0)
        self.placement_missing.set(len(plan.missing))
        if plan.complete:
            self.placement_epoch.set(epoch)
            self.placement_max.set(plan.max_load)
            self.placement_mean.set(plan.mean_load)
            self.placement_replicas.set(plan.replicas)
