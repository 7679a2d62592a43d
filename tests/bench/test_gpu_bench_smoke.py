"""``bench/gpu.py --smoke`` on CPU: the GPU proof's correctness checks all run and pass.

The script is meant to run unattended on a CUDA machine; this runs every path of it that does
not need CUDA (tiny checkpoints written by transformers, the monolithic path, 1x2 m=2 and 2x2
m=1 meshes of real role processes, Mixtral and Qwen3-MoE), as the GPU run will: a subprocess.
The DeepSeek families' smoke (``--families deepseek_v3,deepseek_v2``, ~80 s here) is left
out of the suite for time; the GPU run checks every family.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("mixtral", "qwen3_moe")
EXPECTED = (
    "our loader reads transformers' save_pretrained output",
    "transformers float32 reference is not degenerate",
    "float32 monolithic == transformers greedy",
    "float32 mesh 1x2 m=2 == transformers greedy",
    "float32 mesh 2x2 m=1 == transformers greedy",
    "bfloat16 monolithic top-1 == transformers bfloat16 (teacher forcing)",
    "bfloat16 mesh 1x2 m=2 top-1 == transformers bfloat16 (teacher forcing)",
)


def test_gpu_bench_smoke_passes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--device", "cpu",
         "--families", ",".join(FAMILIES), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    report = json.loads(out.read_text())
    assert report["exit_code"] == 0 and report["passed"], log
    assert [p["status"] for p in report["phases"]] == ["ok", "ok"], report["phases"]
    failed = [c for c in report["checks"] if not c["passed"]]
    assert not failed, failed
    recorded = {(c["family"], c["name"]) for c in report["checks"]}
    missing = [(f, n) for f in FAMILIES for n in EXPECTED if (f, n) not in recorded]
    assert not missing, missing
    for c in report["checks"]:  # the bf16 figures were measured on real positions
        if "top-1" in c["name"]:
            assert c["positions_decided"] > 100 and c["agreement_decided"] >= 0.99, c
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["transformers"] and env["commit"]
    assert report["speed"]["records"] == []  # --smoke measures no speed
