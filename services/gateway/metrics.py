"""Prometheus metrics measured at the gateway: the client's point of view (docs/ARCHITECTURE.md
§8)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from services.common.metrics import LATENCY_BUCKETS, new_registry


class GatewayMetrics:
    """One registry per gateway process; served on ``GET /metrics`` (and ``--metrics-port``)."""

    def __init__(self) -> None:
        self.registry = r = new_registry()
        b = LATENCY_BUCKETS
        self.requests = Counter("megascale:gateway_requests", "Finished requests by endpoint "
                                "and HTTP status", ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("megascale:gateway_requests_in_flight",
                               "Requests being generated now", registry=r)
        self.ttft = Histogram("megascale:gateway_time_to_first_token_seconds",
                              "Arrival at the gateway to the first text sent", buckets=b,
                              registry=r)
        self.e2e = Histogram("megascale:gateway_e2e_request_latency_seconds",
                             "Arrival at the gateway to the last event sent", buckets=b,
                             registry=r)
        self.prompt_tokens = Counter("megascale:gateway_prompt_tokens", "Prompt tokens",
                                     registry=r)
        self.generation_tokens = Counter("megascale:gateway_generation_tokens",
                                         "Generated tokens relayed to clients", registry=r)
        self.retries = Counter("megascale:gateway_replica_retries", "Requests re-sent to "
                               "another replica, by reason", ["reason"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
