"""Prometheus metrics measured at the gateway: the client's point of view (docs/ARCHITECTURE.md
§8).

The request-level series carry vLLM's names with the ``megascale:`` prefix and a
``model_name`` label (the served model name), so dashboards and alerts written for vLLM work
with the prefix swapped: TTFT, ITL, TPOT, E2E latency, prompt / generation tokens, finishes
by reason. They are measured here, where the client's request arrives and its text leaves.
The engine-state series (requests running / waiting, KV usage, queue time, prefix-cache
hits) are the attention replicas' own, under the same kind of names (services/attention/
metrics.py); a Prometheus scraping gateway and replicas gets each series from one place.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from services.common.metrics import LATENCY_BUCKETS, new_registry
from services.core.request import FinishReason

TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class GatewayMetrics:
    """One registry per gateway process; served on ``GET /metrics`` (and ``--metrics-port``)."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = r = new_registry()
        b = LATENCY_BUCKETS
        m = ["model_name"]
        self.requests = Counter("megascale:gateway_requests", "Finished requests by endpoint "
                                "and HTTP status", ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("megascale:gateway_requests_in_flight",
                               "Requests being generated now", registry=r)
        self.retries = Counter("megascale:gateway_replica_retries", "Requests re-sent to "
                               "another replica, by reason", ["reason"], registry=r)
        self.ttft = Histogram("megascale:time_to_first_token_seconds", "Arrival at the "
                              "gateway to the first generated token relayed", m, buckets=b,
                              registry=r).labels(model_name)
        self.itl = Histogram("megascale:inter_token_latency_seconds", "Time between two "
                             "generated tokens relayed (a burst of k tokens counts k gaps of "
                             "1/k of its wait)", m, buckets=b, registry=r).labels(model_name)
        self.tpot = Histogram("megascale:request_time_per_output_token_seconds", "Per "
                              "request: (last token - first token) / (generated tokens - 1)",
                              m, buckets=b, registry=r).labels(model_name)
        self.e2e = Histogram("megascale:e2e_request_latency_seconds", "Arrival at the "
                             "gateway to the request's end", m, buckets=b,
                             registry=r).labels(model_name)
        self.prompt_tokens = Counter("megascale:prompt_tokens", "Prompt tokens of requests "
                                     "received", m, registry=r).labels(model_name)
        self.generation_tokens = Counter("megascale:generation_tokens", "Generated tokens "
                                         "relayed to clients", m, registry=r).labels(model_name)
        self.request_prompt = Histogram("megascale:request_prompt_tokens", "Prompt tokens per "
                                        "request", m, buckets=TOKEN_BUCKETS,
                                        registry=r).labels(model_name)
        self.request_generation = Histogram("megascale:request_generation_tokens", "Generated "
                                            "tokens per finished request", m,
                                            buckets=TOKEN_BUCKETS, registry=r).labels(model_name)
        self.success = Counter("megascale:request_success", "Finished requests by finish "
                               "reason (a stop string counts as stop; a client that went away "
                               "as abort)", ["model_name", "finished_reason"], registry=r)
        for reason in FinishReason:  # every series present from the start (rate() of 0)
            self.success.labels(model_name, reason.value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, arrival: float, prompt_tokens: int) -> RequestClock:
        """Start observing one request that arrived at ``arrival`` (time.monotonic())."""
        self.prompt_tokens.inc(prompt_tokens)
        self.request_prompt.observe(prompt_tokens)
        return RequestClock(self, arrival)


class RequestClock:
    """One request's token timings as the gateway relays them (TTFT, ITL, TPOT, E2E)."""

    def __init__(self, metrics: GatewayMetrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.last = 0.0
        self.tokens = 0
        self.done = False

    def tokens_relayed(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.arrival)
            n_gaps = n - 1  # tokens after the first in the same burst came with no wait
            gap = 0.0
        else:
            n_gaps, gap = n, (now - self.last) / n
        for _ in range(n_gaps):
            self.m.itl.observe(gap)
        self.m.generation_tokens.inc(n)
        self.tokens += n
        self.last = now

    def finish(self, reason: FinishReason | str) -> None:
        """The request ended (once; later calls do nothing)."""
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.monotonic() - self.arrival)
        if self.first is not None and self.tokens > 1:
            self.m.tpot.observe((self.last - self.first) / (self.tokens - 1))
        self.m.request_generation.observe(self.tokens)
        value = reason.value if isinstance(reason, FinishReason) else reason
        self.m.success.labels(self.m.model_name, value).inc()
