"""Reading a role's Prometheus ``/metrics`` in tests. Imported as ``metrics_helpers`` (pytest
puts this folder on sys.path, as for the per-folder helper modules)."""

from __future__ import annotations

import urllib.request


def scrape_metrics(port: int, prefix: str = "megascale:") -> dict[str, float]:
    """The samples served on 127.0.0.1:``port`` whose name starts with ``prefix``, keyed as
    exposed: ``name`` or ``name{label="value",...}``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            key, value = line.rsplit(" ", 1)  # label values may hold spaces; the value cannot
            out[key] = float(value)
    return out
