"""Prefix caching on a real replica (expert node and attention replica as processes): repeated
and extended prompts reuse cached KV blocks (the hit counter moves) and every output stays
equal to the cold run and to Hugging Face transformers (greedy, fp32), also while the small
KV pool evicts cached blocks under concurrent load."""

from __future__ import annotations

import threading

import pytest
from engine_helpers import grpc_generate
from metrics_helpers import scrape_metrics

from services.launch.procs import LocalMesh

NEW = 16
LONG = list(range(100, 141))  # 41 tokens: 10 full blocks of 4 + 1
ARGS = ["--block-size", "4", "--max-batch-tokens", "16", "--max-model-len", "96",
        "--metrics-port", "0"]


def _metric(mesh: LocalMesh, name: str) -> float:
    """``name`` (one series, labelled with the model name) on the replica."""
    got = scrape_metrics(mesh.attention[0].info["metrics_port"])
    (value,) = [v for k, v in got.items() if k.startswith(name + '{model_name="mixtral')]
    return value


def _counts(mesh: LocalMesh) -> tuple[float, float]:
    return (_metric(mesh, "megascale:prefix_cache_queries_total"),
            _metric(mesh, "megascale:prefix_cache_hits_total"))


@pytest.fixture(scope="module")
def mesh(engine_ckpt, tmp_path_factory):
    # 32 blocks (128 token slots): the concurrent phase below cannot keep everything cached
    with LocalMesh.start(engine_ckpt("mixtral"), [list(range(8))], micro_batches=2,
                         attention_args=[*ARGS, "--num-blocks", "32"],
                         workdir=tmp_path_factory.mktemp("prefix")) as m:
        yield m


def test_repeated_and_extended_prompts_hit_the_cache_with_exact_tokens(mesh, engine_ckpt,
                                                                      hf_greedy):
    addr = mesh.attention[0].grpc
    q0, h0 = _counts(mesh)
    assert (q0, h0) == (0, 0)
    cold = grpc_generate(addr, "cold", LONG, NEW).tokens
    q1, h1 = _counts(mesh)
    assert q1 == len(LONG) and h1 == 0
    warm = grpc_generate(addr, "warm", LONG, NEW).tokens
    q2, h2 = _counts(mesh)
    assert q2 - q1 == len(LONG) and h2 - h1 == 40  # every full block but the last token's
    # a longer prompt through the cold run's output: its decoded blocks were cached too
    extended = LONG + cold[:12]
    ext = grpc_generate(addr, "ext", extended, NEW).tokens
    _, h3 = _counts(mesh)
    assert h3 - h2 == 52  # 13 full blocks of the 53 tokens
    # same first 20 tokens, then different ones: only the shared full blocks hit
    branch = LONG[:22] + [7, 8, 9, 10, 11, 12]
    br = grpc_generate(addr, "branch", branch, NEW).tokens
    _, h4 = _counts(mesh)
    assert h4 - h3 == 20
    assert warm == cold
    want = hf_greedy(engine_ckpt("mixtral"), [LONG, extended, branch], NEW)
    assert [cold, ext, br] == want


def test_exact_while_cached_blocks_are_evicted_under_concurrent_load(mesh, engine_ckpt,
                                                                     hf_greedy):
    """Six requests at once over 32 blocks: prompts that share prefixes in pairs, the pool
    too small to keep them all, so cached blocks are evicted (LRU) and requests preempted
    while others still share theirs."""
    base = [list(range(200 + 10 * i, 229 + 10 * i)) for i in range(3)]  # 29 tokens each
    prompts = [p + s for p in base for s in ([1, 2, 3], [4, 5])]
    out: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            out[i] = grpc_generate(mesh.attention[0].grpc, f"ev-{i}", prompts[i], NEW).tokens
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    for _ in range(2):  # the second round finds some blocks cached, others evicted
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[0]
        assert [out[i] for i in range(len(prompts))] == hf_greedy(engine_ckpt("mixtral"),
                                                                  prompts, NEW)
    assert _metric(mesh, "megascale:prefix_cache_evictions_total") > 0


def test_no_enable_prefix_caching_turns_it_off(engine_ckpt, hf_greedy, tmp_path):
    with LocalMesh.start(engine_ckpt("mixtral"), [list(range(8))], micro_batches=2,
                         attention_args=[*ARGS, "--no-enable-prefix-caching"],
                         workdir=tmp_path) as m:
        addr = m.attention[0].grpc
        runs = [grpc_generate(addr, f"r{i}", LONG, NEW).tokens for i in range(2)]
        got = scrape_metrics(m.attention[0].info["metrics_port"])
    assert not any(k.startswith("megascale:prefix_cache") for k in got)
    assert runs == hf_greedy(engine_ckpt("mixtral"), [LONG, LONG], NEW)


def test_a_request_owing_prompt_logprobs_bypasses_the_cache(mesh):
    """Prompt logprobs need every prompt position computed: such a request is not served from
    cached blocks (no hit), and gets one entry per prompt token after the first."""
    addr = mesh.attention[0].grpc
    grpc_generate(addr, "plp-warm", LONG, 2)  # its blocks are cached now
    q0, h0 = _counts(mesh)
    seen: list = []
    grpc_generate(addr, "plp", LONG, 2, prompt_logprobs=1,
                  on_event=lambda ev: seen.extend(ev.prompt_logprobs))
    q1, h1 = _counts(mesh)
    assert q1 - q0 == len(LONG) and h1 == h0
    assert len(seen) == len(LONG) - 1
    grpc_generate(addr, "plp-after", LONG, 2)  # and the cache still serves the others
    assert _counts(mesh)[1] - h1 == 40
