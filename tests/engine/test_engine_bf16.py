"""A bfloat16 deployment across processes: attention replica and expert node both run
``--dtype bfloat16`` and must give exactly the greedy tokens of the one-process reference path
at the same dtype.

Activations cross libm2n as float32 (services/core/moe_wire.py), where bf16 values are exact,
so disaggregation must not change a single token. (Against transformers in bf16 the tokens
agree for a while and then drift apart, as two bf16 implementations do; the float32 tests
hold the model to transformers token for token.)
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import grpc_generate

from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.sampling import SamplingParams
from services.launch.procs import LocalMesh

PROMPTS = [[3, 17, 29, 5], [7, 8, 9, 10, 11, 12, 13], [400]]
NEW_TOKENS = 16
BF16 = ["--dtype", "bfloat16"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bf16_mesh_matches_the_bf16_reference_path(engine_ckpt, tmp_path, family):
    ckpt = engine_ckpt(family)
    ref = MonolithicModel.from_pretrained(ckpt, torch.bfloat16)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = [generate(ref, [p], greedy)[0] for p in PROMPTS]
    with LocalMesh.start(ckpt, [list(range(8))], micro_batches=2, workdir=tmp_path,
                         attention_args=BF16, expert_args=BF16) as mesh:
        got = [grpc_generate(mesh.attention[0].grpc, f"bf16-{i}", p, NEW_TOKENS)
               for i, p in enumerate(PROMPTS)]
    for res in got:
        assert not res.final.error_message, res.final.error_message
    assert [r.tokens for r in got] == [list(w) for w in want]
