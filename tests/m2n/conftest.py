"""Fixtures for the libm2n tests: real peer processes (tests/m2n/m2n_peer.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

PEER = str(Path(__file__).with_name("m2n_peer.py"))


class Peer:
    """One running m2n_peer.py process; ``url`` is what it printed after READY."""

    def __init__(self, args: list[str], prefix: list[str] | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, PEER, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        line = self.proc.stdout.readline()  # bounded: every role prints READY or exits
        if not line.startswith("READY "):
            self.proc.kill()
            err = self.proc.stderr.read()
            raise RuntimeError(f"peer {args} failed to start: {line!r} {err[-2000:]}")
        self.url = line.split(" ", 1)[1].strip()

    def result(self, timeout: float = 60) -> dict:
        out, err = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"peer printed no result; rc={self.proc.returncode} stderr={err[-2000:]}"
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def peers():
    """Start peers with ``peers(args)``; all are SIGKILLed at teardown."""
    started: list[Peer] = []

    def start(args: list[str], prefix: list[str] | None = None) -> Peer:
        p = Peer(args, prefix)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        for stream in (p.proc.stdout, p.proc.stderr):
            stream.close()


@pytest.fixture
def shm_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["shm", "tcp"])
def transport(request) -> str:
    return request.param
