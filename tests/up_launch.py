"""Start ``megascale up`` as a user does and wait for its banner (shared by the tests that
drive a whole launch: tests/mesh, tests/security)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

BANNER_END = "Ctrl-C stops everything"


def start_up(args: list[str], timeout_s: float = 180.0, env: dict[str, str] | None = None
             ) -> tuple[subprocess.Popen, str, str]:
    """``megascale up ARGS`` until its banner ends: (the launcher, the API base URL ending in
    /v1, the banner). Fails the test, with the launcher's last lines, if it does not come up."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, lines = None, []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        if m := re.search(r"megascale is up: (http://\S+/v1)", line):
            url = m.group(1)
        if url and BANNER_END in line:
            break
    if url is None:
        proc.kill()
        pytest.fail(f"megascale up {' '.join(args)} did not come up:\n" + "".join(lines[-40:]))
    return proc, url, "".join(lines)


def stop_up(proc: subprocess.Popen) -> int:
    """SIGTERM the launcher (it stops its children) and return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return proc.returncode
