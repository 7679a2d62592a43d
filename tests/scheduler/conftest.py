"""Fixtures for the scheduler tests (helpers live in sched_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sched_helpers import RedisProcess


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of this test's own, which the test may kill and start again."""
    r = RedisProcess(tmp_path)
    r.start()
    try:
        yield r
    finally:
        r.kill()
