"""The disaggregated path on CUDA: the same checks as the CPU tests, with every role on the GPU.

Skipped without a CUDA device (this project's CI has none); a session lent a GPU runs them
together with ``bench/gpu.py`` (docs/BENCHMARKS.md, GPU).
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import grpc_generate

from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.request import SamplingParams
from services.launch.procs import LocalMesh, partition_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (GPU checks: bench/gpu.py on a GPU)")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 141)), [300]]
NEW_TOKENS = 24


def _mesh_tokens(path, tmp_path, dtype: str, m: int, experts: int) -> list[list[int]]:
    args = ["--device", "cuda", "--dtype", dtype, "--block-size", "4",
            "--max-batch-tokens", "64"]
    with LocalMesh.start(path, partition_experts(8, experts), micro_batches=m,
                         attention_args=args, transport="shm", workdir=tmp_path,
                         expert_args=["--device", "cuda", "--dtype", dtype,
                                      "--max-batch-tokens", "64"]) as mesh:
        got = [grpc_generate(mesh.attention[0].grpc, f"cuda-{i}", p, NEW_TOKENS)
               for i, p in enumerate(PROMPTS)]
        assert {(e.info["device"], e.info["dtype"]) for e in mesh.experts} == {("cuda", dtype)}
    for r in got:
        assert not r.final.error_message, r.final.error_message
    return [r.tokens for r in got]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize(("m", "experts"), [(1, 2), (2, 2), (3, 1)])
def test_cuda_mesh_float32_equals_transformers_on_cuda(engine_ckpt, hf_greedy, tmp_path,
                                                       family, m, experts):
    path = engine_ckpt(family)
    assert _mesh_tokens(path, tmp_path, "float32", m, experts) == hf_greedy(
        path, PROMPTS, NEW_TOKENS, device="cuda")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_mesh_equals_the_reference_path(engine_ckpt, tmp_path, dtype):
    path = engine_ckpt("mixtral")
    ref = MonolithicModel.from_pretrained(path, getattr(torch, dtype), "cuda")
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = [list(generate(ref, [p], greedy)[0]) for p in PROMPTS]
    assert _mesh_tokens(path, tmp_path, dtype, 2, 2) == want
