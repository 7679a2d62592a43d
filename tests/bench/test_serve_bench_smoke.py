"""``bench/serve.py --quick``: two servers driven by the same streaming workload, the figures
``vllm bench serve`` reports computed from the streams, and the JSON record.

Our own ``megascale up`` stands in for both servers (vLLM is never a dependency): once through
``--ours`` (colocated) and once through the generic ``--server`` command line (disaggregated,
1 replica + 1 expert node), so both ways of naming a server are exercised.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_bench_measures_two_servers_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    generic = (f"{sys.executable} -m services.cli up --model {{model}} --port {{port}} "
               "--served-model-name {name} --quiet --layout disaggregated --experts 1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick",
         "--ours", "colocated=--layout colocated", "--server", f"split={generic}",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["workload"]["num_prompts"] == 8 and record["machine"]["cpus"] >= 1
    rows = {r["server"]: r for r in record["results"]}
    assert list(rows) == ["split", "colocated"]  # --server before --ours, as documented
    for name, r in rows.items():
        assert (r["completed"], r["failed"]) == (8, 0), (name, r["errors"])
        assert r["output_tokens"] == 8 * 8  # ignore_eos: every request makes all its tokens
        # prompts re-encode to exactly --input-len tokens; the server adds BOS or not
        assert r["input_tokens"] in (8 * 8, 8 * 9), (name, r["input_tokens"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert 0 < r[key]["median"] <= r[key]["p99"], (name, key, r[key])
        assert r["ttft_ms"]["median"] < r["e2e_ms"]["median"]
        assert r["output_throughput"] > 0
    assert rows["split"]["input_tokens"] == rows["colocated"]["input_tokens"]
    assert "| split |" in proc.stdout and "| colocated |" in proc.stdout
    assert (out.parent / "serve-logs" / "split.log").is_file()
