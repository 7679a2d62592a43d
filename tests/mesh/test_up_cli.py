"""`megascale up` refuses bad launches before it starts anything (one line, exit 2)."""

from __future__ import annotations

import socket
import subprocess
import sys

from services.core.demo import write_random_checkpoint


def test_a_busy_port_is_refused_before_anything_starts(tmp_path):
    model = write_random_checkpoint(tmp_path / "tiny", "mixtral", layers=1, hidden=32,
                                    intermediate=32, experts=2, top_k=1, heads=2, kv_heads=1,
                                    vocab=512, max_position=64, seed=3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "services.cli", "up", "--model", str(model),
                            "--port", str(port), "--workdir", str(tmp_path / "work"),
                            "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--port {port}" in lines[0], r.stderr
    assert not list((tmp_path / "work").glob("*.ready.json"))  # nothing was started


def test_more_expert_copies_than_nodes_is_refused(tmp_path):
    model = write_random_checkpoint(tmp_path / "tiny", "mixtral", layers=1, hidden=32,
                                    intermediate=32, experts=2, top_k=1, heads=2, kv_heads=1,
                                    vocab=512, max_position=64, seed=3)
    r = subprocess.run([sys.executable, "-m", "services.cli", "up", "--model", str(model),
                        "--port", "0", "--experts", "2", "--expert-replicas", "3", "--workdir",
                        str(tmp_path / "work"), "--quiet"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--expert-replicas" in lines[0], r.stderr
