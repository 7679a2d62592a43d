"""The expert node's Prometheus metrics (names in docs/ARCHITECTURE.md §8)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import LATENCY_BUCKETS, new_registry
from services.expert.worker import ComputeEvent, ExpertWorker


class ExpertMetrics:
    """The node's Prometheus metrics."""

    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.tokens = Counter("megascale:expert_tokens", "Token rows computed per expert "
                              "(all layers)", ["expert"], registry=r)
        self.rows = Histogram("megascale:expert_batch_rows", "Rows per expert compute call "
                              "(one layer, all senders)", buckets=(1, 2, 4, 8, 16, 32, 64, 128,
                                                                   256, 512, 1024, 4096),
                              registry=r)
        self.compute = Histogram("megascale:expert_compute_seconds", "T_e: one layer's expert "
                                 "compute over the drained rows", buckets=LATENCY_BUCKETS,
                                 registry=r)

    def watch(self, worker: ExpertWorker) -> None:
        """Export the worker's counters, read at scrape time (no copying on the hot path)."""
        self.registry.register(_WorkerCollector(worker))

    def on_compute(self, ev: ComputeEvent) -> None:
        for e, c in zip(ev.experts, ev.rows_per_expert, strict=True):
            self.tokens.labels(expert=str(e)).inc(c)
        self.rows.observe(ev.rows)
        self.compute.observe(ev.seconds)


class _WorkerCollector(Collector):
    def __init__(self, worker: ExpertWorker) -> None:
        self.worker = worker

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        s = self.worker.stats
        yield CounterMetricFamily("megascale:expert_messages", "Dispatch messages received",
                                  value=s.messages)
        yield CounterMetricFamily("megascale:expert_refused_messages",
                                  "Dispatches answered with an error", value=s.refused)
        up = time.monotonic() - s.started
        yield GaugeMetricFamily("megascale:expert_idle_fraction",
                                "Fraction of uptime not computing",
                                value=max(0.0, 1.0 - s.compute_s / up) if up > 0 else 1.0)
