"""tcp across two network namespaces joined by a veth pair (needs root; skipped otherwise)."""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.netns


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_namespaces():
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"m2na{tag}", f"m2nb{tag}"
    veth_a, veth_b = f"m2va{tag}", f"m2vb{tag}"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create network namespaces: {r.stderr.strip()}")
            created.append(ns)
        steps = [
            ("link", "add", veth_a, "type", "veth", "peer", "name", veth_b),
            ("link", "set", veth_a, "netns", ns_a),
            ("link", "set", veth_b, "netns", ns_b),
            ("-n", ns_a, "addr", "add", "10.231.0.1/24", "dev", veth_a),
            ("-n", ns_b, "addr", "add", "10.231.0.2/24", "dev", veth_b),
            ("-n", ns_a, "link", "set", veth_a, "up"),
            ("-n", ns_b, "link", "set", veth_b, "up"),
            ("-n", ns_a, "link", "set", "lo", "up"),
            ("-n", ns_b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the veth pair ({' '.join(step)}): {r.stderr.strip()}")
        yield ns_a, ns_b
    finally:
        for ns in created:  # deleting a namespace removes its end of the veth pair too
            _ip("netns", "del", ns)


def test_tcp_across_namespaces(two_namespaces, peers):
    ns_a, ns_b = two_namespaces
    echo = peers(["echo", "tcp://10.231.0.1:7811", "tcp://10.231.0.2:7812", "1"],
                 prefix=["ip", "netns", "exec", ns_a])
    assert echo.url == "tcp://10.231.0.1:7811"
    sizes = ",".join(str(s) for s in (2 << 10, 256 << 10, 8 << 20))
    ping = peers(["ping", "0", "tcp://10.231.0.2:7812", echo.url, sizes],
                 prefix=["ip", "netns", "exec", ns_b])
    assert ping.result(timeout=120) == {"ok": 3, "total": 3}
