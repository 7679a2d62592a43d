"""Prometheus metrics of an attention replica (vLLM-style names; docs/ARCHITECTURE.md §8).

The engine-state series vLLM users alert on live here, with vLLM's names and a ``model_name``
label: requests running / waiting, KV usage, queue time, prefix-cache queries and hits. The
request-level ones (TTFT, ITL, TPOT, E2E, tokens, finishes) are the gateway's, where the
client's request arrives and leaves (services/gateway/metrics.py); the replica's own view of
them is kept under ``megascale:replica_*`` names so that no series is exported twice.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from megascale.v1 import common_pb2
from services.attention.batching import StepPlan
from services.attention.engine import Engine
from services.attention.pingpong import StepTimings
from services.common.metrics import LATENCY_BUCKETS, new_registry
from services.core.request import FinishReason

WINDOW = 64  # steps averaged in LoadReport


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def _labelled(self, family, value: float):  # noqa: ANN001, ANN202 - a metric family
        family.add_metric([self.model_name], value)
        return family

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        load = self.engine.load()
        m = ["model_name"]
        yield self._labelled(GaugeMetricFamily("megascale:num_requests_running",
                                               "Requests in the running batch", labels=m),
                             load["running"])
        yield self._labelled(GaugeMetricFamily("megascale:num_requests_waiting",
                                               "Requests waiting to be scheduled", labels=m),
                             load["waiting"])
        yield self._labelled(GaugeMetricFamily("megascale:kv_cache_usage_perc",
                                               "Fraction of KV cache blocks held by requests "
                                               "(0-1; cached blocks no request holds count as "
                                               "free)", labels=m), load["kv_usage"])
        prefix = self.engine.batcher.prefix
        if prefix is not None:  # plain int reads: safe from the scrape thread
            yield self._labelled(CounterMetricFamily(
                "megascale:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                "cache at admission", labels=m), prefix.queries)
            yield self._labelled(CounterMetricFamily(
                "megascale:prefix_cache_hits", "Of the tokens looked up, those found cached "
                "(their prefill skipped)", labels=m), prefix.hits)
            yield self._labelled(CounterMetricFamily(
                "megascale:prefix_cache_evictions", "Cached KV blocks evicted (least "
                "recently used) for new tokens", labels=m), prefix.evictions)
        yield CounterMetricFamily("megascale:lane_rebalance_moves",
                                  "Running requests handed from a larger lane (micro-batch) to "
                                  "a smaller one after others finished",
                                  value=self.engine.batcher.lane_moves)
        finished = self.engine.finished_counts()
        success = CounterMetricFamily("megascale:replica_request_success", "Finished "
                                      "requests by reason, counted by the engine (a request "
                                      "whose client went away counts as abort)",
                                      labels=["reason"])
        for reason in FinishReason:
            success.add_metric([reason.value], finished.get(reason, 0))
        yield success
        client = self.engine.client  # plain int / dict reads: safe from the scrape thread
        yield CounterMetricFamily("megascale:expert_failovers",
                                  "Dispatch parts re-sent to another expert replica because "
                                  "their node went down", value=client.failovers)
        yield CounterMetricFamily("megascale:expert_replies_dropped",
                                  "Expert replies that arrived after their part was re-sent "
                                  "elsewhere or their step failed", value=client.dropped_replies)
        yield GaugeMetricFamily("megascale:expert_nodes_down",
                                "Expert nodes of the current placement routed around",
                                value=len(client.down))


class AttentionMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = r = new_registry()
        b = LATENCY_BUCKETS
        self.ttft = Histogram("megascale:replica_time_to_first_token_seconds",
                              "Arrival at the gateway to first token", buckets=b, registry=r)
        self.itl = Histogram("megascale:replica_inter_token_latency_seconds",
                             "Time between output tokens", buckets=b, registry=r)
        self.e2e = Histogram("megascale:replica_e2e_request_latency_seconds",
                             "Arrival to the last token", buckets=b, registry=r)
        self.queue = Histogram("megascale:request_queue_time_seconds",
                               "Arrival at the gateway to first scheduled on the replica",
                               ["model_name"], buckets=b, registry=r).labels(model_name)
        self.delivery = Histogram("megascale:token_delivery_delay_seconds", "Engine emitted "
                                  "an event (after sampling) to its gRPC stream taking it: the "
                                  "deferred delivery plus the event-loop hop", buckets=b,
                                  registry=r)
        self.generated = Counter("megascale:replica_generation_tokens", "Generated tokens",
                                 registry=r)
        self.prompt = Counter("megascale:replica_prompt_tokens", "Prompt tokens computed "
                              "(prefill, recompute included)", registry=r)
        self.step = Histogram("megascale:step_duration_seconds", "Wall time of one lane's "
                              "step (the m lanes overlap in time)", buckets=b, registry=r)
        self.attn = Histogram("megascale:attention_compute_seconds", "T_a: attention compute "
                              "per lane step (all layers)", buckets=b, registry=r)
        self.wait = Histogram("megascale:expert_wait_seconds", "Time per lane step blocked "
                              "on expert combines", buckets=b, registry=r)
        self.m2n = Histogram("megascale:m2n_latency_seconds", "M2N latency by direction "
                             "(round_trip: dispatch sent to last combine received)",
                             ["direction"], buckets=b, registry=r)
        self._recent: deque[tuple[float, float, float, int, float]] = deque(maxlen=WINDOW)

    def watch(self, engine: Engine) -> None:
        self.registry.register(_EngineCollector(engine, self.model_name))

    def on_step(self, plan: StepPlan, t: StepTimings) -> None:
        """Called by the engine thread after every step."""
        self.step.observe(t.wall_s)
        self.attn.observe(t.attention_s)
        self.wait.observe(t.wait_s)
        prefill = sum(c.num_tokens for c in plan.chunks if not c.samples or c.num_tokens > 1)
        if prefill:
            self.prompt.inc(prefill)
        now = time.monotonic()
        for c in plan.chunks:
            if c.start == 0 and c.request.num_preemptions == 0:
                self.queue.observe(max(0.0, (c.request.first_scheduled or now)
                                       - c.request.arrival))
        sampled = sum(1 for c in plan.chunks if c.samples)
        self._recent.append((t.wall_s, t.attention_s, t.wait_s, sampled, now))
        rtt = self.m2n.labels(direction="round_trip")
        for v in t.round_trips:
            rtt.observe(v)

    def load_report(self, engine: Engine) -> common_pb2.LoadReport:
        load = engine.load()
        recent = list(self._recent)
        n = len(recent) or 1
        span = (recent[-1][4] - recent[0][4]) if len(recent) > 1 else 0.0
        tokens = sum(r[3] for r in recent[1:])
        return common_pb2.LoadReport(
            running=int(load["running"]), waiting=int(load["waiting"]),
            kv_usage=float(load["kv_usage"]), free_kv_blocks=int(load["free_blocks"]),
            step_time_ms=1000 * sum(r[0] for r in recent) / n,
            attention_time_ms=1000 * sum(r[1] for r in recent) / n,
            expert_wait_ms=1000 * sum(r[2] for r in recent) / n,
            tokens_per_s=tokens / span if span > 0 else 0.0,
            reported_at_unix_s=time.time(),
            # list(): one C-level copy under the GIL while the engine thread may mutate it
            expert_nodes_down=sorted(list(engine.client.down)),
            experts_complete=engine.experts_complete())
