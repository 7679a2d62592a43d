"""Keep Python's cyclic GC off the hot threads' backs once a role has started.

A full (generation 2) collection walks every tracked object. After start-up a role holds a
large, permanent heap (torch, gRPC, protobuf, FastAPI and tokenizer machinery, model config
objects): ~180,000 objects in an expert node, and one full collection over them took 93 ms on
the 2-vCPU test machine, holding the GIL, so the engine or drain thread stalled that long
(a served replica ran two such collections per 20 s of decode at batch 1024). ``gc.freeze()``
moves everything alive at that point into a permanent generation the collector never scans;
what is allocated while serving is still collected as before (vLLM's engine core freezes its
start-up heap the same way).
"""

from __future__ import annotations

import gc
import time
import weakref

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


def freeze_startup_heap() -> int:
    """Collect start-up garbage, then freeze what is left; returns the frozen object count.
    Call once, when the role is ready to serve."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# One gc callback per process feeds every live pause histogram (a test process may build
# several roles' registries; each must see the pauses, and a dropped registry must not leak).
_pause_histograms: weakref.WeakSet[Histogram] = weakref.WeakSet()
_gc_started = [0.0]


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - _gc_started[0]
    for hist in list(_pause_histograms):
        hist.labels(generation=str(info["generation"])).observe(seconds)


class _FrozenObjects(Collector):
    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        yield GaugeMetricFamily("python_gc_frozen_objects", "Objects moved to the permanent "
                                "generation by freeze_startup_heap", value=gc.get_freeze_count())


def register_gc_metrics(registry: CollectorRegistry) -> Histogram:
    """On ``registry``: ``python_gc_pause_seconds{generation}``, how long each collection held
    the GIL (the standard GC collector counts collections but does not time them), and
    ``python_gc_frozen_objects``. Returns the histogram."""
    registry.register(_FrozenObjects())
    hist = Histogram("python_gc_pause_seconds", "Time spent in one cyclic GC collection",
                     ["generation"], registry=registry,
                     buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
    for generation in range(3):  # exposed (at zero) before the first collection
        hist.labels(generation=str(generation))
    _pause_histograms.add(hist)
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    return hist
