"""Optional busy-interval traces for pipeline timelines (``bench/pingpong.py``).

When ``MEGASCALE_TIMELINE`` names a directory, a role appends one JSON line per event to
``DIR/<node_id>.jsonl``: attention replicas one line per step (its compute / wait intervals),
expert nodes one line per compute call. Times are ``time.perf_counter()`` values, i.e.
CLOCK_MONOTONIC, which every process on a host shares, so lines from different processes can be
drawn on one time axis. Off (no cost) when the variable is unset.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class TimelineWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the role
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with self._lock:
            self._f.write(line + "\n")


def timeline_for(node_id: str) -> TimelineWriter | None:
    """The writer for ``node_id`` when MEGASCALE_TIMELINE is set, else None."""
    directory = os.environ.get("MEGASCALE_TIMELINE")
    if not directory:
        return None
    return TimelineWriter(Path(directory) / f"{node_id}.jsonl")
