"""Serving as vLLM users expect it, on the whole mesh ``megascale up`` starts (real Redis,
scheduler, 2 expert nodes, 2 attention replicas, gateway): cache-aware routing with prefix
caching, the vLLM-named metrics users alert on, and the Locust load test run headless."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up.base_url, api_key=up.api_key, max_retries=0, timeout=120)


def samples(up, name: str) -> dict[tuple, float]:
    """Every sample of role ``name``'s /metrics, keyed (sample name, sorted labels)."""
    port = up.ready()[name]["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_a_repeated_prefix_is_routed_to_the_replica_that_caches_it(up, client):
    """Four requests with one 80-token prompt, then four with another, one after the other:
    the least-loaded rule alone spreads them (each pick counts until the next load report),
    cache-aware routing keeps each prompt on one replica, so every repeat hits its cache."""
    model = (("model_name", up.model),)
    q, h = "megascale:prefix_cache_queries_total", "megascale:prefix_cache_hits_total"
    replicas = ("attention-0", "attention-1")
    before = {r: samples(up, r) for r in replicas}
    sched0 = samples(up, "scheduler")
    prompts = {"p": [5 + i % 300 for i in range(80)], "q": [400 - i % 300 for i in range(70)]}
    for name in ("p", "q"):
        for _ in range(4):
            client.completions.create(model=up.model, prompt=prompts[name], max_tokens=2,
                                      temperature=0)
    after = {r: samples(up, r) for r in replicas}
    queried = {r: after[r][(q, model)] - before[r].get((q, model), 0) for r in replicas}
    hits = sum(after[r][(h, model)] - before[r].get((h, model), 0) for r in replicas)
    # each prompt's 4 x len tokens were looked up on one replica only
    assert sorted(queried.values()) in ([0, 4 * 80 + 4 * 70], [4 * 70, 4 * 80])
    # every repeat found the prompt's full blocks (16 tokens; the last token is computed)
    assert hits == 3 * 64 + 3 * 64
    affinity = ("megascale:scheduler_prefix_affinity_picks_total", ())
    assert samples(up, "scheduler")[affinity] - sched0.get(affinity, 0) >= 6


def test_vllm_named_metrics_with_model_name(up, client):
    gw0 = samples(up, "gateway")
    plain = client.completions.create(model=up.model, prompt="The experts answered",
                                      max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    text = plain.choices[0].text
    assert plain.choices[0].finish_reason == "length" and len(text) > 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = client.completions.create(model=up.model, prompt="The experts answered",
                                        max_tokens=12, temperature=0, stop=[stop],
                                        stream=True, extra_body={"ignore_eos": True})
    finishes = [c.choices[0].finish_reason for c in stopped if c.choices]
    assert finishes[-1] == "stop"
    gw = samples(up, "gateway")
    m = ("model_name", up.model)

    def moved(name: str, labels: tuple = (m,)) -> float:
        return gw[(name, labels)] - gw0.get((name, labels), 0)

    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert moved(f"megascale:{hist}_count") == 2, hist
    # TPOT needs 2 tokens: the stopped request may have ended on its first
    assert moved("megascale:request_time_per_output_token_seconds_count") >= 1
    assert moved("megascale:inter_token_latency_seconds_count") >= 11
    assert moved("megascale:generation_tokens_total") >= 13
    assert moved("megascale:prompt_tokens_total") > 0
    assert moved("megascale:request_prompt_tokens_count") == 2
    by_reason = {r: moved("megascale:request_success_total", (("finished_reason", r), m))
                 for r in ("stop", "length", "abort", "error")}
    assert by_reason == {"stop": 1, "length": 1, "abort": 0, "error": 0}
    # engine state lives on the replicas, under vLLM's names with the same label
    for r in ("attention-0", "attention-1"):
        got = samples(up, r)
        for name in ("megascale:num_requests_running", "megascale:num_requests_waiting",
                     "megascale:kv_cache_usage_perc", "megascale:prefix_cache_hits_total",
                     "megascale:request_queue_time_seconds_count"):
            assert (name, (m,)) in got, (r, name)
    # ... and nowhere twice: the replicas export no gateway series and vice versa
    assert not any(k[0].startswith("megascale:time_to_first_token") for k in got)
    assert not any(k[0].startswith("megascale:num_requests_running") for k in gw)


def _locust(up, tmp_path: Path, run_s: int, users: int, **env: str) -> tuple[dict, str, dict]:
    out = tmp_path / "summary.json"
    stats = tmp_path / "stats"  # Locust adds .json
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
         "--headless", "-H", up.base_url.removesuffix("/v1"), "-u", str(users), "-r",
         str(users), "--run-time", f"{run_s}s", "--json-file", str(stats), "--only-summary",
         "--stop-timeout", "30"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={**os.environ, "MEGASCALE_API_KEY": up.api_key, "MEGASCALE_MODEL": up.model,
             "MEGASCALE_MAX_TOKENS": "8", "MEGASCALE_LOADTEST_JSON": str(out), **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(e["method"], e["name"]): e["num_requests"]
            for e in json.loads(stats.with_suffix(".json").read_text())}
    return json.loads(out.read_text()), proc.stdout + proc.stderr, rows


def test_locust_closed_loop_reports_stream_latencies_apart(up, tmp_path):
    summary, output, rows = _locust(up, tmp_path, 5, 2)
    assert summary["failed"] == 0 and summary["completed"] >= 4
    assert summary["ttft_count"] >= 1 and summary["itl_count"] >= 1
    assert summary["total_output_tokens"] > 0 and summary["output_throughput"] > 0
    assert 0 < summary["median_ttft_ms"] <= summary["p99_e2el_ms"]
    for line in ("Serving Benchmark Result", "Mean TTFT (ms):", "Median TPOT (ms):",
                 "P99 ITL (ms):", "Mean E2EL (ms):", "Output token throughput (tok/s):"):
        assert line in output, line
    # Locust's own table counts each HTTP request once: no "ttft" pseudo-requests in it
    assert not any("ttft" in name.lower() for _, name in rows)
    generated = sum(n for (kind, _), n in rows.items() if kind == "POST")
    assert generated == summary["completed"] + summary["failed"]


def test_locust_request_rate_mode_is_open_loop(up, tmp_path):
    summary, output, rows = _locust(up, tmp_path, 5, 1, MEGASCALE_REQUEST_RATE="4")
    assert summary["failed"] == 0
    # ~4/s for 5 s, all streaming; arrivals do not wait for earlier requests to finish
    assert summary["completed"] >= 8
    assert summary["ttft_count"] == summary["completed"]
    assert {name for kind, name in rows if kind == "POST"} <= {"completions stream",
                                                               "chat stream"}
