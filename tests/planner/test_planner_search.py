"""Algorithm 1 on the paper's models and hardware: the qualitative results must hold."""

from __future__ import annotations

import pytest

from services.errors import UserError
from services.planner.colocated import search_colocated
from services.planner.hardware import get_gpu
from services.planner.models import PRESETS, MoEShape
from services.planner.search import estimate_with_m, search
from services.planner.simulator import simulate

H20, L40S, H800 = get_gpu("H20"), get_gpu("L40S"), get_gpu("H800")


@pytest.fixture(scope="module")
def dbrx_hetero():
    return search(PRESETS["DBRX"], [H20, L40S], [H20, L40S])


def test_heterogeneous_picks_h20_for_attention_and_l40s_for_experts(dbrx_hetero):
    plan = dbrx_hetero
    assert (plan.attention_gpu, plan.expert_gpu) == ("H20", "L40S")
    assert plan.tp_a in (1, 2, 4, 8) and plan.tp_e in (1, 2, 4, 8)
    assert 2 <= plan.m <= 4
    assert plan.est.t_total <= 0.150
    assert plan.est.batch == plan.n_a * plan.m * plan.est.b_a


@pytest.mark.parametrize("name", ["Mixtral-8x22B", "DBRX", "Qwen3-235B-A22B"])
def test_disaggregated_beats_colocated_per_gpu(name):
    plan = search(PRESETS[name], [H20], [L40S])
    assert plan.colocated is not None
    assert plan.tokens_per_s_per_gpu > plan.colocated.tokens_per_s_per_gpu
    assert plan.tokens_per_s_per_cost > plan.colocated.tokens_per_s_per_cost


def test_homogeneous_h800_beats_colocated_per_gpu():
    plan = search(PRESETS["Mixtral-8x22B"], [H800], [H800])
    assert plan.to_json()["per_gpu_vs_colocated"] > 1.0


@pytest.mark.parametrize("name", ["Mixtral-8x22B", "DBRX"])
def test_m2_vs_m1_is_about_1_9x(name):
    shape = PRESETS[name]
    plan = search(shape, [H20], [L40S], m_values=(2,), with_colocated=False)
    one = estimate_with_m(plan, shape, H20, L40S, 1)
    two = estimate_with_m(plan, shape, H20, L40S, 2)
    assert two.t_c / max(two.t_a, two.t_e) > 0.1  # a paper-like, non-negligible T_c
    assert 1.8 <= two.tokens_per_s / one.tokens_per_s <= 2.0


def test_plan_replays_in_the_simulator(dbrx_hetero):
    p = dbrx_hetero
    sim = simulate(PRESETS["DBRX"].layers, p.m, p.est.t_a, p.est.t_e, p.est.t_c,
                   n_attention=p.n_a, n_expert=p.expert_nodes, batch=p.est.batch)
    assert sim.iteration_time == pytest.approx(p.est.t_total, rel=1e-9)
    assert sim.util_expert == pytest.approx(p.est.util_expert, rel=1e-9)


def test_gpu_budget_is_respected():
    plan = search(PRESETS["DBRX"], [H20], [L40S], max_gpus=20, with_colocated=False)
    assert plan.gpus <= 20
    with pytest.raises(UserError, match="fits in 5 GPUs"):
        search(PRESETS["DBRX"], [H20], [L40S], max_gpus=5, with_colocated=False)


def test_slo_tighter_means_smaller_batch():
    loose = search(PRESETS["DBRX"], [H20], [L40S], with_colocated=False)
    tight = search(PRESETS["DBRX"], [H20], [L40S], slo_s=0.04, with_colocated=False)
    assert tight.est.t_total <= 0.04 < loose.est.t_total
    assert tight.est.b_a < loose.est.b_a


def test_impossible_slo_and_unfittable_model():
    with pytest.raises(UserError, match="no plan meets the 1 ms TBT SLO"):
        search(PRESETS["DBRX"], [H20], [L40S], slo_s=0.001, with_colocated=False)
    huge = MoEShape("huge", layers=200, hidden=32768, heads=64, kv_heads=8, head_dim=512,
                    experts=8, top_k=2, expert_intermediate=131072)
    with pytest.raises(UserError, match="does not fit"):
        search(huge, [L40S], [L40S])


def test_colocated_baseline_is_sane():
    col = search_colocated(PRESETS["Mixtral-8x22B"], H800, 0.150, 730)
    assert col is not None and col.gpus >= 4  # 282 GB of weights need several 80 GB GPUs
    assert col.iteration_time <= 0.150
    stronger = search_colocated(PRESETS["Mixtral-8x22B"], H800, 0.150, 730, attention_dp=True)
    assert stronger.tokens_per_s_per_gpu >= col.tokens_per_s_per_gpu
