"""GC hygiene of the roles: the start-up heap freeze and the GC metrics every role exposes."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from prometheus_client import generate_latest

from services.common import heap
from services.common.metrics import new_registry


def _sample(registry, line_prefix: str) -> float:
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not exposed")


def test_every_collection_is_timed_on_every_live_registry() -> None:
    a, b = new_registry(), new_registry()
    key = 'python_gc_pause_seconds_count{generation="2"}'
    before = _sample(a, key), _sample(b, key)
    gc.collect()
    gc.collect()
    # at least: an automatic collection may slip in between the two reads
    assert _sample(a, key) >= before[0] + 2
    assert _sample(b, key) >= before[1] + 2
    # the standard process and GC collectors are there too
    assert _sample(a, "process_cpu_seconds_total") > 0
    assert _sample(a, 'python_gc_collections_total{generation="2"}') >= 2


def test_a_dropped_registry_stops_being_fed() -> None:
    gc.collect()  # earlier tests' registries
    registry = new_registry()
    n = len(heap._pause_histograms)
    del registry
    gc.collect()
    assert len(heap._pause_histograms) == n - 1
    assert gc.callbacks.count(heap._on_gc) == 1


def test_freeze_keeps_startup_cycles_and_still_collects_new_ones() -> None:
    # In a child: freezing the pytest process's own heap would keep its garbage for good.
    code = textwrap.dedent("""
        import gc, weakref
        from services.common.heap import freeze_startup_heap
        from services.common.metrics import new_registry
        from prometheus_client import generate_latest

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return weakref.ref(a)

        garbage = cycle()  # unreachable already: the freeze collects it first
        kept = Node(); kept.me = kept; kept_ref = weakref.ref(kept)
        frozen = freeze_startup_heap()
        assert garbage() is None
        assert frozen > 1000 and gc.get_freeze_count() == frozen
        del kept
        later = cycle()
        gc.collect()
        assert kept_ref() is not None, "a frozen object was scanned and collected"
        assert later() is None, "garbage made after the freeze was not collected"
        text = generate_latest(new_registry()).decode()
        assert f"python_gc_frozen_objects {float(frozen)}" in text, text
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
