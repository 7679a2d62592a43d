"""DeepSeek variants we do not implement are one-line errors naming the key, never a wrong
answer; `megascale demo-model` writes the family."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.core.config import ModelConfig
from services.errors import ConfigError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MEGASCALE_TORCH_THREADS": "1"}


def v3_dict(**changes) -> dict:
    d = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=512,
             hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
             q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_group=4, topk_group=2, norm_topk_prob=True,
             routed_scaling_factor=2.5, max_position_embeddings=256,
             num_nextn_predict_layers=1, topk_method="noaux_tc", scoring_func="sigmoid")
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


def test_a_hub_style_v3_config_parses():
    cfg = ModelConfig.from_hf_dict(v3_dict(
        rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1},
        quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                             "activation_scheme": "dynamic", "weight_block_size": [128, 128]}))
    assert cfg.family == "deepseek_v3" and cfg.mtp_layers == 1
    assert cfg.quantization.block == (128, 128)
    inv_freq, attn_factor = cfg.rope_inv_freq()
    assert inv_freq.shape == (4,) and attn_factor == 1.0  # mscale == mscale_all_dim


@pytest.mark.parametrize("changes,key", [
    (dict(architectures=["DeepseekV32ForCausalLM"]), "architectures: DeepseekV32ForCausalLM"),
    (dict(architectures=["DeepseekV4ForCausalLM"]), "architectures: DeepseekV4ForCausalLM"),
    (dict(index_topk=2048, index_n_heads=64), "index_topk"),
    (dict(compress_rates={"0": 4}), "compress_rates"),
    (dict(use_mtp=True), "use_mtp"),
    (dict(scoring_func="sqrtsoftplus"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(kv_lora_rank=None), "kv_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}),
     "quantization_config.quant_method"),
    (dict(quantization_config={"quant_method": "fp8", "fmt": "e4m3"}),
     "quantization_config.weight_block_size"),
    (dict(quantization_config={"quant_method": "fp8", "fmt": "e5m2",
                               "weight_block_size": [128, 128]}), "quantization_config.fmt"),
])
def test_unsupported_variants_are_one_line_errors_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_dict(v3_dict(**changes))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_v2_variants():
    v2 = v3_dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                 topk_method="group_limited_greedy", scoring_func=..., norm_topk_prob=False)
    assert ModelConfig.from_hf_dict(v2).router_spec.method == "group_limited_greedy"
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        ModelConfig.from_hf_dict({**v2, "norm_topk_prob": True})
    with pytest.raises(ConfigError, match="topk_method"):
        ModelConfig.from_hf_dict({**v2, "topk_method": "noaux_tc"})


def test_cli_reports_an_unsupported_variant_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v3_dict(
        architectures=["DeepseekV32ForCausalLM"], index_topk=64)))
    r = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model",
                        str(tmp_path), "--prompt-ids", "1,2"], capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 2
    assert "DeepseekV32ForCausalLM" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_demo_model_writes_the_family(tmp_path):
    """`megascale demo-model --family deepseek_v3` goes through transformers' writer;
    GQA-only options are refused."""
    from services.core.demo import write_random_checkpoint
    from services.errors import UserError

    out = write_random_checkpoint(tmp_path / "v3", "deepseek_v3", layers=2, hidden=64,
                                  intermediate=32, experts=8, heads=4, kv_heads=4, vocab=512,
                                  dense_layers=(0,), tokenizer=False)
    cfg = ModelConfig.from_pretrained(out)
    assert cfg.family == "deepseek_v3" and cfg.sparse_layers == (False, True)
    assert cfg.router_spec.n_group == 4 and cfg.shared_expert_intermediate_size == 32
    with pytest.raises(UserError, match="first layers"):
        write_random_checkpoint(tmp_path / "bad", "deepseek_v3", layers=2, dense_layers=(1,),
                                kv_heads=4, tokenizer=False)
    with pytest.raises(UserError, match="--kv-heads"):
        write_random_checkpoint(tmp_path / "bad", "deepseek_v2", kv_heads=2, tokenizer=False)
