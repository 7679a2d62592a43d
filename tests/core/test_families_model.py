"""Qwen2-MoE, OLMoE, GLM-4.5, DBRX, MiniMax-M2 and gpt-oss on the monolithic path: token-for-token
equal to transformers (greedy, fp32), on checkpoints transformers itself wrote
(tests/conftest.py ``family_ckpt``).

Each family's own feature is checked to be live: turning it off changes the logits, so the
equality above is not an accident of a feature that never fires.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from prefill_helpers import prefill_logits
from transformers import AutoModelForCausalLM

from services.core.config import ModelConfig
from services.core.generate import generate
from services.core.model import AttentionSide, ExpertSide, MonolithicModel
from services.core.request import SamplingParams
from services.errors import ConfigError

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 141)), [300]]
NEW_TOKENS = 32
FAMILIES = ["qwen2_moe", "olmoe", "glm4_moe", "dbrx", "minimax_m2", "gpt_oss"]


def ours(path, n=NEW_TOKENS, model=None):
    model = model or MonolithicModel.from_pretrained(path)
    return generate(model, PROMPTS, SamplingParams(temperature=0, max_tokens=n,
                                                   ignore_eos=True), block_size=4)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_transformers(family_ckpt, hf_greedy, name):
    path = family_ckpt(name)
    got = ours(path)
    want = hf_greedy(path, PROMPTS, NEW_TOKENS)
    for prompt, g, w in zip(PROMPTS, got, want, strict=True):
        assert g == w, f"{name}: prompt of length {len(prompt)} diverged"
    assert len({t for g in got for t in g}) > 20  # a degenerate model would make this weak


# name -> the family's features, each switched off in turn (a ModelConfig change, or an
# attention-side layer weight dropped)
ABLATIONS = {
    "qwen2_moe": ["shared_gate"],  # the shared expert's sigmoid gate
    "olmoe": [dict(clip_qkv=None)],
    "glm4_moe": [dict(rotary_dim=None)],  # partial rotary -> full
    "dbrx": [dict(norm_type="rms")],  # LayerNorm -> RMSNorm
    "minimax_m2": ["router_bias"],  # the selection bias
    "gpt_oss": [dict(window_layers=(False, False)), "sinks", dict(swiglu_limit=None),
                "router_bias"],
}


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_prefill_logits_match_and_the_feature_is_live(family_ckpt, name):
    """Several sequences in one step (mixed lengths) give transformers' last-token logits;
    without the family's feature they do not."""
    path = family_ckpt(name)
    model = MonolithicModel.from_pretrained(path)
    logits = prefill_logits(model, PROMPTS)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = []
    for p in PROMPTS:
        with torch.no_grad():
            want.append(ref(torch.tensor([p])).logits[0, -1])
    torch.testing.assert_close(logits, torch.stack(want), atol=1e-4, rtol=0)

    for ablation in ABLATIONS[name]:
        cfg = model.cfg
        if isinstance(ablation, dict):
            cfg = dataclasses.replace(cfg, **ablation)
        attn = AttentionSide.from_pretrained(path, cfg=cfg)
        if isinstance(ablation, str):
            for lw in attn.w.layers:
                setattr(lw, ablation, None)
        changed = prefill_logits(MonolithicModel(attn, ExpertSide.from_pretrained(path, cfg=cfg)),
                                 PROMPTS)
        assert (changed - logits).abs().max() > 1e-2, ablation


def test_config_reads_the_families(family_ckpt):
    q = ModelConfig.from_pretrained(family_ckpt("qwen2_moe"))
    assert q.sparse_layers == (True, False, True)  # mlp_only_layers = [1]
    assert q.shared_expert_intermediate_size == 48 and q.shared_expert_gate
    assert q.attention_bias and q.o_proj_bias is False and not q.qk_norm
    o = ModelConfig.from_pretrained(family_ckpt("olmoe"))
    assert o.qk_norm and o.qk_norm_full_width and o.clip_qkv == 1.5
    assert not o.norm_topk_prob and o.attention_bias and o.o_proj_bias
    g = ModelConfig.from_pretrained(family_ckpt("glm4_moe"))
    assert g.sparse_layers == (False, True, True) and g.rotary_dim == 12 and g.head_dim == 24
    r = g.router_spec
    assert (r.scoring, r.method, r.score_bias, r.norm_topk_prob) == (
        "sigmoid", "noaux_tc", True, True)
    assert r.routed_scaling_factor == 2.5 and g.shared_expert_intermediate_size == 32
    assert g.rope_inv_freq()[0].shape == (6,)
    b = ModelConfig.from_pretrained(family_ckpt("dbrx"))
    assert (b.num_layers, b.num_kv_heads, b.num_experts, b.top_k) == (2, 2, 8, 3)
    assert b.norm_type == "layer" and b.clip_qkv == 1.5 and b.rms_norm_eps == 1e-5
    assert b.router_spec.topk_norm_p == 1.0 and b.max_position_embeddings == 4096
    m = ModelConfig.from_pretrained(family_ckpt("minimax_m2"))
    assert m.qk_norm_full_width and m.rotary_dim == 12 and not m.attention_bias
    r = m.router_spec
    assert (r.scoring, r.method, r.n_group, r.score_bias, r.norm_topk_prob) == (
        "sigmoid", "noaux_tc", 1, True, True)
    o = ModelConfig.from_pretrained(family_ckpt("gpt_oss"))
    assert o.window_layers == (True, False) and o.layer_window == 8 and o.sliding_window is None
    assert o.attention_sinks and o.expert_bias and o.swiglu_limit == 1.0
    assert o.router_spec.topk_softmax and o.router_spec.logit_bias
    assert dict(o.rope_scaling)["rope_type"] == "yarn" and o.rope_inv_freq()[1] > 1.0


@pytest.mark.parametrize("p,dtype", [(1.0, torch.float32), (2.0, torch.float32),
                                     (None, torch.float32), (1.0, torch.bfloat16)])
def test_dbrx_routing_equals_transformers(p, dtype):
    """DBRX divides the top-k softmax weights by their p-norm (moe_normalize_expert_weights)."""
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    from services.core import routing

    cfg = DbrxConfig(d_model=32, n_heads=4, n_layers=1, ffn_config=dict(
        ffn_hidden_size=16, moe_num_experts=8, moe_top_k=3, moe_normalize_expert_weights=p))
    ffn = DbrxFFN(cfg).to(dtype)
    torch.manual_seed(3)
    x = torch.randn(50, 32, dtype=dtype)
    want_w, want_ids = ffn.route_tokens_to_experts(ffn.router(x))
    spec = ModelConfig.from_hf_dict(_dbrx_dict(ffn={"moe_num_experts": 8, "moe_top_k": 3,
                                                    "moe_normalize_expert_weights": p})
                                    ).router_spec
    ids, w = routing.route(x, ffn.router.layer.weight.detach(), spec)
    assert w.dtype == dtype
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w.detach(), atol=0, rtol=0)


def test_decoder_sparse_step_chooses_the_moe_layers():
    d = _qwen2_dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert ModelConfig.from_hf_dict(d).sparse_layers == (False, True, False, False, False, True)


@pytest.mark.parametrize("name", FAMILIES)
def test_expert_partition_sums_to_full(family_ckpt, name):
    """Experts split over sides (as over nodes) give the same tokens; shared experts and
    their gate stay on the attention side."""
    path = family_ckpt(name)
    attn = AttentionSide.from_pretrained(path)
    parts = [ExpertSide.from_pretrained(path, ids) for ids in ([0, 5], [1, 2, 7], [3, 4, 6])]
    full = ExpertSide.from_pretrained(path)
    assert ours(path, 12, MonolithicModel(attn, parts)) == ours(
        path, 12, MonolithicModel(attn, full))


def _qwen2_dict(**changes) -> dict:
    d = dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=512,
             hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=256, qkv_bias=True)
    return d | changes


def _olmoe_dict(**changes) -> dict:
    d = dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", vocab_size=512,
             hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=256, clip_qkv=8.0)
    return d | changes


def _glm_dict(**changes) -> dict:
    d = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", vocab_size=512,
             hidden_size=64, intermediate_size=64, moe_intermediate_size=32, head_dim=24,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             first_k_dense_replace=1, max_position_embeddings=256, n_group=1, topk_group=1,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                              "partial_rotary_factor": 0.5})
    return d | changes


def _dbrx_dict(attn=None, ffn=None, **changes) -> dict:
    d = dict(architectures=["DbrxForCausalLM"], model_type="dbrx", vocab_size=512, d_model=64,
             n_heads=4, n_layers=2, max_seq_len=256,
             attn_config={"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 5e5, **(attn or {})},
             ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2,
                         **(ffn or {})})
    return d | changes


def _minimax_dict(**changes) -> dict:
    # the released config.json's spelling: legacy rotary_dim, rope_theta at top level
    d = dict(architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", vocab_size=512,
             hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, rotary_dim=12, rope_theta=5e6,
             num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
             use_qk_norm=True, qk_norm_type="per_layer", attn_type_list=[1, 1],
             scoring_func="sigmoid", use_routing_bias=True, shared_intermediate_size=0)
    return d | changes


def _gpt_oss_dict(**changes) -> dict:
    d = dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=512,
             hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=256, sliding_window=128,
             layer_types=["sliding_attention", "full_attention"], swiglu_limit=7.0,
             rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                           "beta_slow": 1.0, "truncate": False,
                           "original_max_position_embeddings": 4096}, rope_theta=150000)
    return d | changes


@pytest.mark.parametrize("make,changes,key", [
    (_qwen2_dict, dict(use_sliding_window=True), "sliding_window"),  # and no window
    (_qwen2_dict, dict(layer_types=["sliding_attention", "full_attention"]), "sliding_window"),
    (_qwen2_dict, dict(layer_types=["chunked_attention", "full_attention"]), "layer_types"),
    (_qwen2_dict, dict(hidden_act="gelu"), "hidden_act"),
    (_qwen2_dict, dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (_qwen2_dict, dict(decoder_sparse_step=0.5), "decoder_sparse_step"),
    (_olmoe_dict, dict(clip_qkv=-1), "clip_qkv"),
    (_olmoe_dict, dict(head_dim=8), "head_dim"),
    (_olmoe_dict, dict(sliding_window=128), "sliding_window"),
    (_glm_dict, dict(n_group=3), "n_group"),
    (_glm_dict, dict(first_k_dense_replace=5), "first_k_dense_replace"),
    (_glm_dict, dict(mlp_bias=True), "mlp_bias"),
    (_glm_dict, dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 1.5}),
     "partial_rotary_factor"),
    (_glm_dict, dict(use_mtp=True), "use_mtp"),
    (_dbrx_dict, dict(attn={"clip_qkv": -8}), "attn_config.clip_qkv"),
    (_dbrx_dict, dict(attn={"attn_type": "grouped_query_attention"}), "attn_config.attn_type"),
    (_dbrx_dict, dict(ffn={"ffn_act_fn": {"name": "gelu"}}), "ffn_config.ffn_act_fn"),
    (_dbrx_dict, dict(ffn={"moe_normalize_expert_weights": 0}),
     "ffn_config.moe_normalize_expert_weights"),
    (_dbrx_dict, dict(ffn={"ffn_hidden_size": None}), "ffn_config.ffn_hidden_size"),
    (_minimax_dict, dict(attn_type_list=[0, 1]), "attn_type_list"),
    (_minimax_dict, dict(qk_norm_type="per_head"), "qk_norm_type"),
    (_minimax_dict, dict(use_qk_norm=False), "use_qk_norm"),
    (_minimax_dict, dict(shared_intermediate_size=64), "shared_intermediate_size"),
    (_minimax_dict, dict(scoring_func="softmax"), "scoring_func"),
    (_minimax_dict, dict(use_routing_bias=False), "use_routing_bias"),
    (_minimax_dict, dict(rotary_dim=13), "partial_rotary_factor"),
    (_gpt_oss_dict, dict(layer_types=["sliding_attention", "chunked_attention"]),
     "layer_types"),
    (_gpt_oss_dict, dict(layer_types=["full_attention"]), "layer_types"),
    (_gpt_oss_dict, dict(sliding_window=None), "sliding_window"),
    (_gpt_oss_dict, dict(swiglu_limit=-1), "swiglu_limit"),
    (_gpt_oss_dict, dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_unsupported_variants_are_one_line_errors_naming_the_key(make, changes, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_dict(make(**changes))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_hub_style_configs_parse():
    """Keys as the released checkpoints spell them (transformers 4.x top-level RoPE fields,
    GLM-4.5's top-level partial_rotary_factor, Qwen1.5-MoE without qkv_bias)."""
    g = _glm_dict(rope_parameters=None, rope_theta=1e6, partial_rotary_factor=0.5,
                  num_nextn_predict_layers=1, use_qk_norm=True, attention_bias=True)
    cfg = ModelConfig.from_hf_dict(json.loads(json.dumps(g)))
    assert cfg.rotary_dim == 12 and cfg.mtp_layers == 1 and cfg.rope_theta == 1e6
    assert cfg.rope_scaling is None
    q = _qwen2_dict()
    del q["qkv_bias"]
    assert ModelConfig.from_hf_dict(q).attention_bias  # transformers' default
    # GLM without the key: transformers' default of half-width rotary
    g2 = _glm_dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert ModelConfig.from_hf_dict(g2).rotary_dim == 12
    # DBRX as released: rope_theta in attn_config, moe_normalize_expert_weights absent (= 1)
    b = ModelConfig.from_hf_dict(_dbrx_dict())
    assert b.rope_theta == 5e5 and b.router_spec.topk_norm_p == 1.0 and b.clip_qkv == 8.0
    m = ModelConfig.from_hf_dict(_minimax_dict())  # MiniMax-M2 as released
    assert m.rotary_dim == 12 and m.rope_theta == 5e6 and m.qk_norm_full_width
    o = ModelConfig.from_hf_dict(_gpt_oss_dict())  # gpt-oss as released (4.x rope spelling)
    assert o.rope_theta == 150000 and o.layer_window == 128
    assert ModelConfig.from_hf_dict(_gpt_oss_dict(layer_types=None)).window_layers == (
        True, False)  # transformers' default alternation


@pytest.mark.parametrize("family", FAMILIES)
def test_demo_model_writes_the_family(tmp_path, family):
    """`megascale demo-model --family F` goes through transformers' writer."""
    from services.core.demo import write_random_checkpoint

    dense = {"qwen2_moe": (1,), "olmoe": (), "glm4_moe": (0,), "dbrx": (),
             "minimax_m2": (), "gpt_oss": ()}[family]
    out = write_random_checkpoint(tmp_path / family, family, layers=2, hidden=64,
                                  intermediate=32, experts=4, heads=4, kv_heads=2, vocab=256,
                                  dense_layers=dense, tokenizer=False, shards=2)
    cfg = ModelConfig.from_pretrained(out)
    assert cfg.family == family and cfg.num_experts == 4
    assert cfg.sparse_layers == tuple(i not in dense for i in range(2))
    assert (out / "model.safetensors.index.json").is_file()
    MonolithicModel.from_pretrained(out)  # every tensor the writer made is read and known


def test_mxfp4_dequantize_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from services.core import mxfp4

    torch.manual_seed(5)
    w = torch.randn(3, 8, 64) * 0.3
    blocks, scales = mxfp4.quantize(w)
    ours = mxfp4.dequantize(blocks, scales, torch.float32)
    # transformers returns the input-major [E, in, out] layout of its parameters
    assert torch.equal(ours.transpose(1, 2), convert_moe_packed_tensors(blocks, scales,
                                                                        dtype=torch.float32))
    assert (ours - w).abs().max() < 0.25 and not torch.equal(ours, w)
    with pytest.raises(ValueError, match="_blocks has shape"):
        mxfp4.dequantize(blocks[..., :8], scales, torch.float32)


def test_gpt_oss_mxfp4_checkpoint_equals_transformers(family_ckpt, hf_greedy, tmp_path):
    """Expert weights as MXFP4 blocks/scales (as gpt-oss ships) are dequantized at load. The
    referee is transformers on the same checkpoint with its own MXFP4 dequantization
    (``convert_moe_packed_tensors``) applied to the experts: its MXFP4 loader needs
    ``accelerate``, which this project does not install."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path = family_ckpt("gpt_oss", mxfp4=True)
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.mxfp4 and cfg.quantization is None
    ref = tmp_path / "dequantized"
    shutil.copytree(path, ref)
    t = load_file(str(path / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in t
    for k in [k for k in t if k.endswith("_blocks")]:
        base = k.removesuffix("_blocks")
        t[base] = convert_moe_packed_tensors(t.pop(k), t.pop(base + "_scales"),
                                             dtype=torch.float32)
    save_file(t, str(ref / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((ref / "config.json").read_text())
    del d["quantization_config"]
    (ref / "config.json").write_text(json.dumps(d))
    got = ours(path)
    assert got == hf_greedy(ref, PROMPTS, NEW_TOKENS)
    assert got != hf_greedy(family_ckpt("gpt_oss"), PROMPTS, NEW_TOKENS)  # FP4 rounding shows
    # an expert node reads only its experts' blocks
    part = ExpertSide.from_pretrained(path, [1, 6])
    assert part.expert_ids == (1, 6) and part.w.gate_up_bias[0].shape == (2, 64)


def test_mxfp4_is_refused_outside_gpt_oss():
    with pytest.raises(ConfigError, match="quantization_config.quant_method: mxfp4"):
        ModelConfig.from_hf_dict(_qwen2_dict(quantization_config={"quant_method": "mxfp4"}))


@pytest.mark.parametrize("layout,skewed", [("torch", False), ("packed", False),
                                           ("loop", False), ("loop", True)])
def test_grouped_ffn_with_expert_biases_and_clamped_swiglu(layout, skewed):
    """gpt-oss's experts on every grouped path (torch grouped GEMM, packed CPU kernel, the
    per-expert loop in its balanced and skewed forms) equal a per-token reference, with ids
    that are not held (-1) contributing nothing."""
    import functools

    from services.core import cpu_gemm, gpt_oss
    from services.core.layers import _grouped_ffn_loop, grouped_expert_ffn

    if layout == "packed" and not cpu_gemm.ACTIVE:
        pytest.skip(f"packed CPU kernel off: {cpu_gemm.REASON}")
    g = torch.Generator().manual_seed(1)
    n, H, inter, N, K = 4, 16, 24, 21, 2
    gu, dn = torch.randn(n, H, 2 * inter, generator=g), torch.randn(n, inter, H, generator=g)
    bgu, bdn = torch.randn(n, 2 * inter, generator=g), torch.randn(n, H, generator=g)
    rows, weights = torch.randn(N, H, generator=g), torch.rand(N, K, generator=g)
    ids = torch.randint(-1, n, (N, K), generator=g)
    if skewed:  # one expert takes nearly every row: the loop's per-expert branch
        ids = torch.where(torch.rand(N, K, generator=g) < 0.9, 0, ids)
    act = functools.partial(gpt_oss.clamped_swiglu, alpha=1.702, limit=1.0)
    if layout == "loop":
        got = _grouped_ffn_loop(rows, ids, weights, gu, dn, act, bgu, bdn)
    else:
        stacks = (gu, dn) if layout == "torch" else (cpu_gemm.pack(gu), cpu_gemm.pack(dn))
        got = grouped_expert_ffn(rows, ids, weights, *stacks, act, bgu, bdn)
    want = torch.zeros(N, H)
    for t in range(N):
        for k in range(K):
            e = int(ids[t, k])
            if e >= 0:
                h = act((rows[t] @ gu[e] + bgu[e])[None])[0]
                want[t] += weights[t, k] * (h @ dn[e] + bdn[e])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qwen2_moe_sliding_window_layers_equal_transformers(family_ckpt, hf_greedy):
    """``use_sliding_window``: the even layers below ``max_window_layers`` attend to the last
    ``sliding_window`` positions (the windows gpt-oss uses), others to the whole context."""
    path = family_ckpt("qwen2_moe", use_sliding_window=True, sliding_window=6)
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.window_layers == (True, False, True) and cfg.layer_window == 6
    got = ours(path)
    assert got == hf_greedy(path, PROMPTS, NEW_TOKENS)
    full = dataclasses.replace(cfg, window_layers=(), layer_window=None)
    model = MonolithicModel(AttentionSide.from_pretrained(path, cfg=full),
                            ExpertSide.from_pretrained(path, cfg=full))
    assert ours(path, model=model) != got  # the windows matter on these prompts


def test_demo_model_cli_writes_gpt_oss_mxfp4_and_refuses_it_elsewhere(tmp_path):
    """`megascale demo-model --family gpt_oss --mxfp4` (a subprocess): harmony tokenizer,
    MXFP4 experts; `--mxfp4` on another family is a one-line error."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGASCALE_TORCH_THREADS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120, env=env)

    out = tmp_path / "oss"
    r = cli("demo-model", "--family", "gpt_oss", "--mxfp4", "--out", out, "--layers", "2",
            "--hidden", "64", "--intermediate", "32", "--experts", "4", "--vocab", "512")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GptOssForCausalLM"]
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert "<|start|>" in (out / "tokenizer_config.json").read_text()
    r = cli("generate", "--model", out, "--prompt", "Hello", "--max-tokens", "4",
            "--ignore-eos")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = cli("demo-model", "--family", "olmoe", "--mxfp4", "--out", tmp_path / "bad")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--mxfp4" in r.stderr
