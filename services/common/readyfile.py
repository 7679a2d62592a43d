"""Ready files: how a role process tells its launcher where it listens.

A role started with ``--ready-file PATH`` writes one JSON object there once every server is
up (ports chosen with 0 are resolved by then). The write is atomic (temp file + rename), so a
reader that sees the file sees all of it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write_ready_file(path: str | Path | None, info: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    os.replace(tmp, path)


def wait_ready_file(path: str | Path, timeout_s: float, alive=None) -> dict[str, Any]:  # noqa: ANN001
    """Wait for ``path`` to appear; ``alive()`` returning False aborts early (child died)."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if alive is not None and not alive():
            raise RuntimeError(f"process exited before writing its ready file {path}")
        time.sleep(0.05)
    raise TimeoutError(f"no ready file at {path} after {timeout_s:g} s")
