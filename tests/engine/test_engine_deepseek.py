"""DeepSeek-V2/V3 disaggregated across real processes equals transformers (greedy, fp32).

The attention replicas keep the MLA latent cache and run the shared experts; the expert nodes
hold the routed experts. V3 here on M x N = 2x2, m = 2; V2 crosses a 1x2, m = 1 mesh through
`megascale up` and the openai client (tests/mesh/test_mesh_deepseek.py).
"""

from __future__ import annotations

import pytest
from test_engine_equivalence import NEW_TOKENS, PROMPTS, run_concurrently

from services.launch.procs import LocalMesh, partition_experts

# (checkpoint, attention replicas, expert nodes (0 = colocated), m, transport); few meshes
# keep the suite short
CASES = {
    "v3_2a2e_m2": ("v3", 2, 2, 2, "shm"),
    "v3_colocated": ("v3", 1, 0, 1, "tcp"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_disaggregated_deepseek_equals_transformers(deepseek_ckpt, hf_greedy, tmp_path, case):
    name, n_attn, n_exp, m, transport = CASES[case]
    path = deepseek_ckpt(name)
    experts = partition_experts(8, n_exp, ()) if n_exp else []  # [] = --local-experts
    with LocalMesh.start(path, experts, attention_replicas=n_attn,
                         micro_batches=m,
                         attention_args=["--block-size", "4", "--max-batch-tokens", "64"],
                         workdir=tmp_path, transport=transport) as mesh:
        got = run_concurrently(mesh)
    want = hf_greedy(path, PROMPTS, NEW_TOKENS)
    for prompt, g, w in zip(PROMPTS, got, want, strict=True):
        assert g == w, f"{case}: prompt of length {len(prompt)} diverged"
    assert len({t for g in got for t in g}) > 10
