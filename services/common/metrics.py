"""Prometheus exposition for a role: one registry per process, served over HTTP.

Metric names follow vLLM's style (``megascale:...``; docs/ARCHITECTURE.md §8). Each role builds
its metric objects on the registry returned by :func:`new_registry` and calls
:func:`serve_metrics`.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from services.common.heap import register_gc_metrics

# Latency buckets (seconds) shared by TTFT / ITL / e2e / step / m2n histograms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def new_registry() -> CollectorRegistry:
    """A role's registry, with the standard process (CPU seconds, RSS, open fds), platform and
    Python GC collectors every Prometheus client exposes by default on its global registry, plus
    GC pause times and the frozen start-up heap (:mod:`services.common.heap`)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    register_gc_metrics(registry)
    return registry


def serve_metrics(registry: CollectorRegistry, host: str, port: int | None) -> int | None:
    """Serve ``/metrics`` on ``host:port`` (0 picks a free port); returns the bound port."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
