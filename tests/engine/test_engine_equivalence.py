"""Disaggregated generation across real processes equals Hugging Face transformers (greedy).

Attention replicas and expert nodes are separate ``megascale serve`` processes talking over
libm2n; requests of different lengths arrive at different times and run concurrently.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from engine_helpers import grpc_generate
from metrics_helpers import scrape_metrics

from services.core import cpu_gemm
from services.launch.procs import LocalMesh, partition_experts

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 141)), [300], list(range(20, 37))]
NEW_TOKENS = 48

# (attention replicas, expert nodes, replicated experts, m, transport, stream interval)
TOPOLOGIES = {
    "1a1e_m1": (1, 1, (), 1, "tcp", 1),
    "2a2e_m2": (2, 2, (), 2, "shm", 1),
    "1a3e_m3_uneven_replicated": (1, 3, (3,), 3, "tcp", 5),
}


def run_concurrently(mesh: LocalMesh) -> list[list[int]]:
    """Submit PROMPTS staggered in time, spread over the replicas; return tokens per prompt."""
    results: list[list[int] | None] = [None] * len(PROMPTS)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            time.sleep(0.05 * i)  # arrive at different times: joins a running batch
            address = mesh.attention[i % len(mesh.attention)].grpc
            r = grpc_generate(address, f"req-{i}", PROMPTS[i], NEW_TOKENS)
            assert r.final.error_message == ""
            results[i] = r.tokens
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_disaggregated_tokens_equal_transformers(engine_ckpt, hf_greedy, tmp_path, family,
                                                 topology):
    n_attn, n_exp, replicated, m, transport, interval = TOPOLOGIES[topology]
    path = engine_ckpt(family)
    experts = partition_experts(8, n_exp, replicated)
    with LocalMesh.start(path, experts, attention_replicas=n_attn, micro_batches=m,
                         attention_args=["--block-size", "4", "--max-batch-tokens", "64",
                                         "--stream-interval", str(interval)],
                         workdir=tmp_path, transport=transport) as mesh:
        got = run_concurrently(mesh)
        # the nodes computed with the packed CPU kernel wherever this machine runs it
        gemm = {e.info["expert_gemm"] for e in mesh.experts}
        assert gemm == {"packed" if cpu_gemm.ACTIVE else "torch"}
    want = hf_greedy(path, PROMPTS, NEW_TOKENS)
    for prompt, g, w in zip(PROMPTS, got, want, strict=True):
        assert g == w, f"{family}/{topology}: prompt of length {len(prompt)} diverged"
    assert len({t for g in got for t in g}) > 10  # a degenerate model would make this weak


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_colocated_tokens_equal_transformers(engine_ckpt, hf_greedy, tmp_path, family):
    """Colocated mode (``--local-experts``): the replica computes every expert itself, with
    two threads; concurrent staggered requests stay token-exact."""
    path = engine_ckpt(family)
    with LocalMesh.start(path, [], attention_replicas=1, micro_batches=1,
                         attention_args=["--block-size", "4", "--max-batch-tokens", "64",
                                         "--threads", "2"],
                         workdir=tmp_path) as mesh:
        got = run_concurrently(mesh)
        log = (tmp_path / "attention-0.log").read_text()
    assert "experts in-process (colocated)" in log
    want = hf_greedy(path, PROMPTS, NEW_TOKENS)
    for prompt, g, w in zip(PROMPTS, got, want, strict=True):
        assert g == w, f"{family}/colocated: prompt of length {len(prompt)} diverged"


def test_lanes_do_not_drain_at_step_boundaries(engine_ckpt, hf_greedy, tmp_path):
    """m=2: each lane steps on its own, so one lane starts its next step while the other is
    still mid-step (a step-synchronous engine never overlaps steps); the tokens stay exact."""
    path = engine_ckpt("mixtral")
    timeline = tmp_path / "timeline"
    with LocalMesh.start(path, [list(range(8))], micro_batches=2,
                         attention_args=["--block-size", "4", "--max-batch-tokens", "64",
                                         "--metrics-port", "0"],
                         workdir=tmp_path, transport="shm",
                         env={"MEGASCALE_TIMELINE": str(timeline)}) as mesh:
        got = run_concurrently(mesh)
        delay = scrape_metrics(mesh.attention[0].info["metrics_port"])
    assert got == hf_greedy(path, PROMPTS, NEW_TOKENS)
    # every streamed event's deferred-delivery delay is measured (one event per token here)
    assert delay["megascale:token_delivery_delay_seconds_count"] >= len(PROMPTS) * NEW_TOKENS
    assert delay["megascale:token_delivery_delay_seconds_sum"] > 0
    steps = [json.loads(x) for x in (timeline / "attention-0.jsonl").read_text().splitlines()]
    lanes = {s["lane"] for s in steps}
    assert lanes == {0, 1}
    spans = {lane: [(s["start"], s["start"] + s["wall"]) for s in steps if s["lane"] == lane]
             for lane in lanes}
    # a lane step that starts while a step of the other lane is running
    overlapping = sum(1 for a0, _ in spans[0] for b0, b1 in spans[1] if b0 < a0 < b1)
    overlapping += sum(1 for a0, _ in spans[1] for b0, b1 in spans[0] if b0 < a0 < b1)
    assert overlapping >= NEW_TOKENS // 2, f"only {overlapping} of {len(steps)} steps overlap"
    # every attention interval of a step lies inside it, tagged with its lane
    for s in steps:
        end = s["start"] + s["wall"] + 1e-6
        for _kind, _layer, lane, a, b in s["intervals"]:
            assert lane == s["lane"] and s["start"] - 1e-6 <= a <= b <= end


def test_a_request_moves_to_a_lane_left_empty_with_exact_tokens(engine_ckpt, hf_greedy, tmp_path):
    """m=2: A, B, C arrive one after another, so they alternate lanes (A and C in lane 0, B in
    lane 1). B is short: once it finishes, lane 0 is two requests larger and hands its newest,
    C, to lane 1. C's tokens stay exact across the move."""
    path = engine_ckpt("mixtral")
    prompts = {"A": [5, 6, 7], "B": [40, 41], "C": [300, 301, 302, 303]}
    lengths = {"A": 96, "B": 40, "C": 96}
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    with LocalMesh.start(path, [list(range(8))], micro_batches=2, transport="shm",
                         attention_args=["--block-size", "4", "--metrics-port", "0"],
                         workdir=tmp_path) as mesh:
        replica = mesh.attention[0]

        def one(key: str, started: threading.Event) -> None:
            try:
                r = grpc_generate(replica.grpc, key, prompts[key], lengths[key],
                                  on_event=lambda _ev: started.set())
                assert r.final.error_message == ""
                results[key] = r.tokens
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
                started.set()

        threads = []
        for key in prompts:  # each one is running (admitted to a lane) before the next comes
            started = threading.Event()
            threads.append(threading.Thread(target=one, args=(key, started)))
            threads[-1].start()
            assert started.wait(30), f"{key} produced no token"
        for t in threads:
            t.join(timeout=120)
        moves = scrape_metrics(replica.info["metrics_port"])["megascale:lane_rebalance_moves_total"]
    if errors:
        raise errors[0]
    assert moves == 1
    want = hf_greedy(path, list(prompts.values()), max(lengths.values()))
    for (key, n), w in zip(lengths.items(), want, strict=True):
        assert results[key] == w[:n], f"{key} diverged"
