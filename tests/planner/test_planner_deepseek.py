"""The planner knows the DeepSeek family: MLA KV bytes, shared-expert work on the attention
side, q_lora or not, and a DeepSeek-V3 preset it can plan."""

from __future__ import annotations

import json

from services.planner.hardware import get_gpu
from services.planner.models import PRESETS, from_hf_config, load_model
from services.planner.perf_model import kv_bytes_per_seq
from services.planner.search import search


def test_v3_preset_kv_and_shared_expert():
    v3 = PRESETS["DeepSeek-V3"]
    assert v3.attention == "mla"
    # latent 512 + rope key 64 per token and layer, bf16: 57x less than per-head K/V
    assert v3.kv_bytes_per_token_layer == 2 * (512 + 64)
    assert kv_bytes_per_seq(v3, 1000) == 1000 * 61 * 1152
    no_shared = type(v3)(**{**v3.__dict__, "shared_intermediate": 0})
    assert v3.attn_params_per_layer - no_shared.attn_params_per_layer == 3 * 7168 * 2048
    assert 600e9 < v3.total_params < 720e9 and 30e9 < v3.active_params < 45e9


def test_hf_configs_of_the_family(deepseek_ckpt):
    tiny = load_model(str(deepseek_ckpt("v3")))
    assert (tiny.attention, tiny.experts, tiny.shared_intermediate) == ("mla", 8, 32)
    assert (tiny.q_lora_rank, tiny.kv_lora_rank, tiny.rope_dim) == (48, 32, 8)
    v2 = json.loads((deepseek_ckpt("v2") / "config.json").read_text())
    lite = from_hf_config(v2)  # q_lora_rank null: a plain q_proj
    assert lite.q_lora_rank == 0
    h, qk = 64, 16 + 8
    q_lora = type(lite)(**{**lite.__dict__, "q_lora_rank": 48})
    assert (q_lora.attn_params_per_layer - lite.attn_params_per_layer
            == h * 48 + 48 * 4 * qk - h * 4 * qk)


def test_deepseek_v3_plans():
    plan = search(PRESETS["DeepSeek-V3"], [get_gpu("H20")], [get_gpu("L40S")], max_gpus=512,
                  with_colocated=False)
    assert plan.est.t_total <= 0.150 and plan.m >= 2 and plan.n_a >= 1
