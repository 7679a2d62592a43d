"""The committed gRPC stubs must be exactly what scripts/gen_proto.sh generates now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
V1 = ROOT / "proto" / "megascale" / "v1"
FIX = "run `scripts/gen_proto.sh` and commit the regenerated stubs"


def _stubs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*_pb2*.py*"))}


def test_committed_stubs_match_fresh_ones(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    # Run from an unrelated cwd: the script must find the repository by itself.
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    fresh = _stubs(tmp_path / "megascale" / "v1")
    committed = _stubs(V1)
    protos = sorted(p.stem for p in V1.glob("*.proto"))
    assert protos, "no .proto files found"
    # Every .proto gives the three stub files.
    expected = {f"{s}{ext}" for s in protos for ext in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
    assert set(fresh) == expected
    missing = sorted(expected - set(committed))
    extra = sorted(set(committed) - expected)
    assert not missing, f"stubs missing: {missing}; {FIX}"
    assert not extra, f"stubs without a .proto: {extra}; delete them and {FIX}"
    stale = sorted(name for name in expected if committed[name] != fresh[name])
    assert not stale, f"stale generated stubs: {stale}; {FIX}"
