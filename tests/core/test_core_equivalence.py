"""Token-for-token equality with Hugging Face transformers (greedy, float32), both families."""

from __future__ import annotations

import pytest
import torch
from prefill_helpers import prefill_logits
from transformers import AutoModelForCausalLM

from services.core import cpu_gemm
from services.core.generate import generate
from services.core.model import AttentionSide, ExpertSide, MonolithicModel
from services.core.request import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(100, 141)), [300]]
NEW_TOKENS = 48


def hf_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare full-length runs (we ignore EOS too)
    return model.eval()


@pytest.mark.parametrize("expert_gemm", ["default", "torch"])
@pytest.mark.parametrize("name", ["mixtral", "mixtral_mqa_top1", "qwen3_dense",
                                  "qwen3_mqa_top1_tied"])
def test_greedy_tokens_equal_transformers(ckpt_factory, name, expert_gemm):
    path = ckpt_factory(name)
    # "default": the packed CPU kernel where it runs (services/core/cpu_gemm.py); "torch":
    # torch's grouped GEMM, the path GPUs and bf16 take
    model = MonolithicModel.from_pretrained(path, pack_experts=expert_gemm == "default")
    assert all(side.packed == (expert_gemm == "default" and cpu_gemm.ACTIVE)
               for side in model.experts)
    ours = generate(model, PROMPTS,
                    SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                    block_size=4)
    ref = hf_model(path)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), do_sample=False,
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        want = out[0, len(prompt):].tolist()
        assert got == want, f"{name}: prompt of length {len(prompt)} diverged"
        assert len(set(got)) > 1  # a degenerate model would make this test weak


@pytest.mark.parametrize("name", ["mixtral", "qwen3_dense"])
def test_batched_prefill_logits_match(ckpt_factory, name):
    path = ckpt_factory(name)
    model = MonolithicModel.from_pretrained(path)
    logits = prefill_logits(model, PROMPTS)
    ref = hf_model(path)
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[i], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_dense"])
def test_expert_partition_sums_to_full(ckpt_factory, name):
    path = ckpt_factory(name)
    attn = AttentionSide.from_pretrained(path)
    cfg = attn.cfg
    full = ExpertSide.from_pretrained(path)
    parts = [ExpertSide.from_pretrained(path, ids) for ids in ([0, 3], [1, 4, 5], [2])]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(37, cfg.hidden_size, generator=gen)
    layer = cfg.sparse_layer_ids[0]
    from services.core.layers import route

    ids, weights = route(rows, attn.w.layers[layer].router, cfg.top_k, cfg.norm_topk_prob)
    ids[5, 0] = -1  # "no expert" marker contributes nothing
    want = full.forward(layer, rows, ids, weights)
    got = sum(p.forward(layer, rows, ids, weights) for p in parts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # ...and the engine path with split experts generates the same tokens as the full model.
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    split = MonolithicModel(attn, parts)
    assert generate(split, PROMPTS, params) == generate(MonolithicModel(attn, full), PROMPTS,
                                                        params)
    # a side with no experts at all returns zeros
    empty = ExpertSide.from_pretrained(path, [])
    assert torch.count_nonzero(empty.forward(layer, rows, ids, weights)) == 0
