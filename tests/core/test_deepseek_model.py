"""DeepSeek-V2/V3 on the monolithic path: token-for-token equal to transformers (greedy, fp32).

The checkpoints are written by transformers itself (tests/conftest.py ``deepseek_ckpt``): V3
with sigmoid + bias group-limited routing, a shared expert, a dense first layer and q_lora;
V2 with softmax group-limited routing, no q_lora, two shared experts and YaRN + mscale.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from prefill_helpers import prefill_logits
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from services.core import routing
from services.core.batch import build_batch_meta
from services.core.config import ModelConfig
from services.core.generate import generate
from services.core.kv_cache import BlockManager, PagedKVCache
from services.core.model import AttentionSide, ExpertSide, MonolithicModel
from services.core.request import SamplingParams
from services.errors import CheckpointError

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 141)), [300]]
NEW_TOKENS = 32


def hf_tokens(path, prompts, n):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n)
        out.append(ids[0, len(p):].tolist())
    return out


def ours(path, n=NEW_TOKENS, model=None):
    model = model or MonolithicModel.from_pretrained(path)
    return generate(model, PROMPTS, SamplingParams(temperature=0, max_tokens=n,
                                                   ignore_eos=True), block_size=4)


@pytest.mark.parametrize("name", ["v3", "v2"])
def test_greedy_tokens_equal_transformers(deepseek_ckpt, name):
    path = deepseek_ckpt(name)
    got = ours(path)
    want = hf_tokens(path, PROMPTS, NEW_TOKENS)
    for prompt, g, w in zip(PROMPTS, got, want, strict=True):
        assert g == w, f"{name}: prompt of length {len(prompt)} diverged"
        assert len(set(g)) > 1  # a degenerate model would make this test weak


def test_config_reads_the_family(deepseek_ckpt):
    v3 = ModelConfig.from_pretrained(deepseek_ckpt("v3"))
    assert v3.sparse_layers == (False, True, True)  # first_k_dense_replace = 1
    assert v3.mla.q_lora_rank == 48 and v3.mla.rope_interleave
    r = v3.router_spec
    assert (r.scoring, r.method, r.n_group, r.topk_group, r.score_bias) == (
        "sigmoid", "noaux_tc", 4, 2, True)
    assert r.norm_topk_prob and r.routed_scaling_factor == 2.5
    assert v3.shared_expert_intermediate_size == 32
    v2 = ModelConfig.from_pretrained(deepseek_ckpt("v2"))
    assert v2.mla.q_lora_rank is None
    assert (v2.router_spec.scoring, v2.router_spec.method) == ("softmax", "group_limited_greedy")
    # YaRN: scores scaled by mscale(factor, mscale_all_dim)^2 on top of 1/sqrt(qk_head_dim)
    m = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert v2.mla.softmax_scale == pytest.approx(24 ** -0.5 * m * m)


def test_batched_prefill_logits_match(deepseek_ckpt):
    """Several sequences in one step (mixed lengths) give transformers' last-token logits."""
    path = deepseek_ckpt("v3")
    model = MonolithicModel.from_pretrained(path)
    logits = prefill_logits(model, PROMPTS)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[i], want, atol=1e-4, rtol=0)


def test_kv_cache_holds_the_latent_and_rope_key(deepseek_ckpt):
    cfg = ModelConfig.from_pretrained(deepseek_ckpt("v3"))
    kv = PagedKVCache(cfg, 10, 4)
    C, R = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
    assert kv.k.shape == (cfg.num_layers, 1, 10, 4, C + R) and kv.v is None
    assert PagedKVCache.bytes_per_block(cfg, 16, torch.bfloat16) == cfg.num_layers * 16 * (
        C + R) * 2
    per_head = 2 * cfg.num_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) // 2
    assert C + R < per_head  # what MLA saves over per-head K/V


def test_expert_partition_sums_to_full(deepseek_ckpt):
    """Experts split over sides (as over nodes) give the same tokens; shared experts stay on
    the attention side."""
    path = deepseek_ckpt("v3")
    attn = AttentionSide.from_pretrained(path)
    parts = [ExpertSide.from_pretrained(path, ids) for ids in ([0, 5], [1, 2, 7], [3, 4, 6])]
    full = ExpertSide.from_pretrained(path)
    assert ours(path, 12, MonolithicModel(attn, parts)) == ours(path, 12,
                                                                 MonolithicModel(attn, full))


@pytest.mark.parametrize("n_group,topk_group", [(4, 2), (1, 1), (8, 3)])
def test_v3_routing_equals_transformers_router(n_group, topk_group):
    torch.manual_seed(n_group)
    cfg = type("C", (), dict(num_experts_per_tok=3, num_local_experts=16, hidden_size=32,
                             routed_scaling_factor=2.5, n_group=n_group, topk_group=topk_group,
                             norm_topk_prob=True))()
    ref = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        ref.weight.normal_(0, 0.3)
        ref.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(64, 32)
    _, want_w, want_ids = ref(x)
    spec = routing.RouterSpec(num_experts=16, top_k=3, scoring="sigmoid", method="noaux_tc",
                              n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
                              routed_scaling_factor=2.5, score_bias=True, logits_float32=True,
                              weights_float32=True)
    ids, w = routing.route(x, ref.weight.detach(), spec, ref.e_score_correction_bias)
    _assert_same_choice(ids, w, want_ids, want_w)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_routing_equals_transformers_router(method):
    torch.manual_seed(7)
    cfg = type("C", (), dict(num_experts_per_tok=3, num_experts=16, hidden_size=32,
                             routed_scaling_factor=1.5, topk_method=method, n_group=4,
                             topk_group=2))()
    ref = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        ref.weight.normal_(0, 0.3)
    x = torch.randn(64, 32)
    _, want_w, want_ids = ref(x)
    spec = routing.RouterSpec(num_experts=16, top_k=3, scoring="softmax", method=method,
                              n_group=4, topk_group=2, routed_scaling_factor=1.5,
                              logits_float32=True, weights_float32=True)
    ids, w = routing.route(x, ref.weight.detach(), spec)
    _assert_same_choice(ids, w, want_ids, want_w)


def _assert_same_choice(ids, w, want_ids, want_w):
    # transformers takes top-k unsorted: compare each row's (id, weight) pairs by id
    o, wo = ids.sort(dim=-1), want_ids.sort(dim=-1)
    assert torch.equal(o.values, wo.values)
    torch.testing.assert_close(w.gather(1, o.indices), want_w.gather(1, wo.indices),
                               atol=0, rtol=0)


def test_sharded_checkpoint_with_index(deepseek_ckpt):
    """transformers' own multi-file layout (model.safetensors.index.json) loads the same."""
    sharded = deepseek_ckpt("v3", shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    assert ours(sharded, 12) == ours(deepseek_ckpt("v3"), 12)


def test_mtp_weights_are_skipped_with_a_log_line(deepseek_ckpt, tmp_path, caplog):
    """A checkpoint with multi-token-prediction modules (model.layers.{L}.*) serves as without
    them; the MTP tensors are not read."""
    src = deepseek_ckpt("v3")
    dst = tmp_path / "mtp"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    L = 3
    for k in [k for k in tensors if k.startswith("model.layers.2.")]:
        tensors[k.replace("model.layers.2.", f"model.layers.{L}.")] = tensors[k].clone()
    tensors[f"model.layers.{L}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="megascale.core.checkpoint"):
        model = MonolithicModel.from_pretrained(dst)
    assert any("multi-token-prediction" in r.getMessage() for r in caplog.records)
    assert ours(dst, 12, model) == ours(src, 12)
    # without the config saying so, a tensor past the last layer is a mismatch, not skipped
    cfg["num_nextn_predict_layers"] = 0
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.3\."):
        MonolithicModel.from_pretrained(dst)


@pytest.mark.parametrize("name", ["v3", "v2"])
def test_absorbed_decode_equals_the_expanded_form(deepseek_ckpt, name):
    """Decode steps attend in latent space (W_uk / W_uv absorbed); the logits equal the
    expanded form (what transformers computes) up to float rounding, over a growing context."""
    model = MonolithicModel.from_pretrained(deepseek_ckpt(name))
    bm = BlockManager(64, 4)
    kvs = {True: model.new_kv_cache(64, 4), False: model.new_kv_cache(64, 4)}
    for i, p in enumerate(PROMPTS):
        bm.allocate(i)
        bm.append_slots(i, len(p))
    meta = build_batch_meta([bm.block_table(i) for i in range(len(PROMPTS))],
                            [0] * len(PROMPTS), [len(p) for p in PROMPTS], 4)
    flat = torch.tensor([t for p in PROMPTS for t in p])
    tokens = None
    for absorb in (True, False):
        model.attention.mla_absorb = absorb
        logits = model.forward(flat, meta, kvs[absorb])
        tokens = logits.argmax(-1)
    lens = [len(p) for p in PROMPTS]
    for _ in range(6):  # decode steps: one token per sequence
        for i in range(len(PROMPTS)):
            bm.append_slots(i, 1)
        meta = build_batch_meta([bm.block_table(i) for i in range(len(PROMPTS))], lens,
                                [1] * len(PROMPTS), 4)
        out = {}
        for absorb in (True, False):
            model.attention.mla_absorb = absorb
            out[absorb] = model.forward(tokens, meta, kvs[absorb])
        torch.testing.assert_close(out[True], out[False], atol=2e-4, rtol=1e-5)
        assert torch.equal(out[True].argmax(-1), out[False].argmax(-1))
        tokens = out[True].argmax(-1)
        lens = [n + 1 for n in lens]
    assert model.attention.w.layers[1].mla.absorbed is not None  # the absorbed path ran


def test_v3_without_rope_interleave(deepseek_ckpt, tmp_path):
    """``rope_interleave: false`` (rotate-half RoPE on the rope dims) also matches."""
    src = deepseek_ckpt("v3")
    dst = tmp_path / "halves"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_interleave"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    assert not ModelConfig.from_pretrained(dst).mla.rope_interleave
    got = ours(dst, 16)
    assert got == hf_tokens(dst, PROMPTS, 16)
    assert got != ours(src, 16)  # the layout matters: this is not the interleaved model
