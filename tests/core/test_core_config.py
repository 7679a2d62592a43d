"""ModelConfig parsing/validation and RoPE frequencies (transformers as the referee)."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.core.config import ModelConfig
from services.errors import ConfigError

MIXTRAL = {"architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "eos_token_id": 2,
           "rope_theta": 1e6}
QWEN = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "head_dim": 32, "intermediate_size": 80, "moe_intermediate_size": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 512, "decoder_sparse_step": 2,
        "mlp_only_layers": [3], "norm_topk_prob": True, "eos_token_id": [5, 6],
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}


def test_normalises_both_families():
    m = ModelConfig.from_hf_dict(MIXTRAL)
    assert (m.family, m.head_dim, m.num_experts, m.top_k) == ("mixtral", 16, 4, 2)
    assert m.sparse_layers == (True, True) and m.norm_topk_prob and not m.qk_norm
    assert m.rope_theta == 1e6 and m.eos_token_ids == (2,) and m.rope_scaling is None
    q = ModelConfig.from_hf_dict(QWEN)
    # decoder_sparse_step 2 -> layers 1, 3 sparse; layer 3 is mlp_only -> dense
    assert q.sparse_layers == (False, True, False, False)
    assert (q.head_dim, q.expert_intermediate_size, q.dense_intermediate_size) == (32, 16, 80)
    assert q.qk_norm and q.eos_token_ids == (5, 6) and q.rope_theta == 5e5
    hash(q)  # frozen and hashable (rope params are frozen too)
    q2 = ModelConfig.from_hf_dict({**QWEN, "num_local_experts": 8})  # HF 5 spelling
    assert q2.num_experts == 8


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"hidden_size": 66}, "divisible"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"vocab_size": None}, "vocab_size"),
    ({"num_local_experts": None}, "num_local_experts"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field) as info:
        ModelConfig.from_hf_dict({**MIXTRAL, **change})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
     "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 128},
])
def test_rope_frequencies_match_transformers(scaling):
    d = {**MIXTRAL, "head_dim": 16, "rope_parameters": {"rope_theta": 1e4, **scaling}}
    ours, our_scale = ModelConfig.from_hf_dict(d).rope_inv_freq()
    hf_cfg = MixtralConfig(**{k: v for k, v in d.items() if k not in ("architectures",
                                                                      "rope_theta")})
    ref, ref_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(ours, ref)
    assert our_scale == pytest.approx(ref_scale)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
