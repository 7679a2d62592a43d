"""The planner's gpt-oss-120b and GLM-4.5 presets have their published sizes and plan; the
tiny Qwen2-MoE / OLMoE / GLM-4.5 configs transformers writes are read with their shared
experts."""

from __future__ import annotations

import pytest

from services.planner.hardware import get_gpu
from services.planner.models import PRESETS, load_model
from services.planner.search import search


@pytest.mark.parametrize("name,total,active", [("gpt-oss-120b", 117e9, 5.1e9),
                                               ("GLM-4.5", 355e9, 32e9)])
def test_presets_have_the_published_sizes(name, total, active):
    shape = PRESETS[name]
    # within 5% / 15%: the presets count dense layers as MoE layers and embeddings as active
    assert abs(shape.total_params - total) / total < 0.05
    assert abs(shape.active_params - active) / active < 0.15
    plan = search(shape, [get_gpu("H20")], [get_gpu("L40S")], max_gpus=256,
                  with_colocated=False)
    assert plan.est.t_total <= 0.150 and plan.n_a >= 1


def test_hf_configs_of_the_families(family_ckpt):
    assert load_model(str(family_ckpt("qwen2_moe"))).shared_intermediate == 48
    assert load_model(str(family_ckpt("glm4_moe"))).shared_intermediate == 32
    olmoe = load_model(str(family_ckpt("olmoe")))
    assert (olmoe.shared_intermediate, olmoe.expert_intermediate) == (0, 32)
