"""Disaggregated generation across real processes equals Hugging Face transformers (greedy).

Attention replicas and expert nodes are separate ``megascale serve`` processes talking over
libm2n; requests of different lengths arrive at different times and run concurrently.
"""

from __future__ import annotations

import threading
import time

import pytest
from engine_helpers import grpc_generate

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
    want = hf_greedy(path, PROMPTS, NEW_TOKENS)
    for prompt, g, w in zip(PROMPTS, got, want, strict=True):
        assert g == w, f"{family}/{topology}: prompt of length {len(prompt)} diverged"
    assert len({t for g in got for t in g}) > 10  # a degenerate model would make this weak
