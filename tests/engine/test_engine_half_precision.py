"""A bfloat16 (or float16) deployment across processes: attention replica and expert node both
run ``--dtype bfloat16`` and must give exactly the greedy tokens of the one-process reference
path at the same dtype.

Activations cross libm2n in the compute dtype and gate weights as float32, which holds them
exactly (services/core/moe_wire.py), so disaggregation must not change a single token.
(Against transformers in bf16 the tokens agree for a while and then drift apart, as two bf16
implementations do; the float32 tests hold the model to transformers token for token.)
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import grpc_generate

from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.request import SamplingParams
from services.launch.procs import LocalMesh

PROMPTS = [[3, 17, 29, 5], [7, 8, 9, 10, 11, 12, 13], [400]]
NEW_TOKENS = 16


@pytest.mark.parametrize(("family", "dtype"), [("mixtral", "bfloat16"), ("qwen3_moe", "bfloat16"),
                                               ("mixtral", "float16")])
def test_half_precision_mesh_matches_the_reference_path(engine_ckpt, tmp_path, family, dtype):
    ckpt = engine_ckpt(family)
    ref = MonolithicModel.from_pretrained(ckpt, getattr(torch, dtype))
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = [generate(ref, [p], greedy)[0] for p in PROMPTS]
    with LocalMesh.start(ckpt, [list(range(8))], micro_batches=2, workdir=tmp_path,
                         attention_args=["--dtype", dtype],
                         expert_args=["--dtype", dtype]) as mesh:
        got = [grpc_generate(mesh.attention[0].grpc, f"{dtype}-{i}", p, NEW_TOKENS)
               for i, p in enumerate(PROMPTS)]
    for res in got:
        assert not res.final.error_message, res.final.error_message
    assert [r.tokens for r in got] == [list(w) for w in want]
