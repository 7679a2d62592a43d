"""Small random DeepSeek-V2/V3 checkpoints, written by ``transformers`` itself.

The model is built from a ``DeepseekV2Config`` / ``DeepseekV3Config`` by transformers, its
parameters are re-drawn with the same margin-friendly scales as ``demo.py`` (clear gaps between
top logits and between routed experts, so float32 summation order never flips a greedy choice),
and ``save_pretrained`` writes config.json and the (optionally sharded) safetensors in the hub
layout. ``megascale demo-model --family deepseek_v3`` calls this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from services.errors import UserError

DEEPSEEK_FAMILIES = ("deepseek_v2", "deepseek_v3")


def deepseek_hf_config(family: str, *, layers: int, hidden: int, intermediate: int,
                       experts: int, top_k: int, heads: int, vocab: int, dense_layers: int,
                       dense_intermediate: int, shared_experts: int, q_lora_rank: int | None,
                       kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                       v_head_dim: int, n_group: int, topk_group: int, topk_method: str | None,
                       routed_scaling_factor: float, max_position: int,
                       rope_scaling: dict | None, special: dict[str, int]) -> dict[str, Any]:
    """The config.json fields (transformers spelling) of a DeepSeek-V2/V3 checkpoint."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, **(rope_scaling or {})}
    d: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=dense_intermediate,
        moe_intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, n_shared_experts=shared_experts, n_routed_experts=experts,
        num_experts_per_tok=top_k, first_k_dense_replace=dense_layers,
        q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
        routed_scaling_factor=routed_scaling_factor, max_position_embeddings=max_position,
        rope_parameters=rope, bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"), tie_word_embeddings=False)
    if family == "deepseek_v3":
        d |= dict(n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
                  rope_interleave=True)
    else:
        d |= dict(n_group=n_group, topk_group=topk_group,
                  topk_method=topk_method or "greedy", norm_topk_prob=False)
    return d


def write_deepseek_checkpoint(out_dir: str | Path, family: str = "deepseek_v3", *,
                              layers: int = 3, hidden: int = 64, intermediate: int = 32,
                              experts: int = 8, top_k: int = 2, heads: int = 4,
                              vocab: int = 512, dense_layers: int = 1,
                              dense_intermediate: int | None = None, shared_experts: int = 1,
                              q_lora_rank: int | None = 48, kv_lora_rank: int = 32,
                              qk_nope_head_dim: int = 16, qk_rope_head_dim: int = 8,
                              v_head_dim: int = 16, n_group: int = 4, topk_group: int = 2,
                              topk_method: str | None = None,
                              routed_scaling_factor: float = 2.5, max_position: int = 4096,
                              rope_scaling: dict | None = None, seed: int = 0, shards: int = 1,
                              tokenizer: bool = True) -> Path:
    """Write a random DeepSeek checkpoint with transformers and return its directory."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    if family not in DEEPSEEK_FAMILIES:
        raise UserError(f"family must be one of {', '.join(DEEPSEEK_FAMILIES)}, got {family!r}")
    if not 0 <= dense_layers <= layers:
        raise UserError(f"--dense-layers must be a count in [0, {layers}] for {family} "
                        "(first_k_dense_replace)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = None
    if tokenizer:
        try:  # the Qwen-style demo tokenizer (ChatML template) serves any family
            from services.core.tokenizer_build import build_demo_tokenizer
            special = build_demo_tokenizer(out, "qwen3_moe", vocab)
        except ImportError:
            special = None
    special = special or {"bos": 1, "eos": 2, "pad": 0}
    d = deepseek_hf_config(
        family, layers=layers, hidden=hidden, intermediate=intermediate, experts=experts,
        top_k=top_k, heads=heads, vocab=vocab, dense_layers=dense_layers,
        dense_intermediate=dense_intermediate or 2 * intermediate, shared_experts=shared_experts,
        q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, n_group=n_group,
        topk_group=topk_group, topk_method=topk_method,
        routed_scaling_factor=routed_scaling_factor, max_position=max_position,
        rope_scaling=rope_scaling, special=special)
    v3 = family == "deepseek_v3"
    config = (DeepseekV3Config if v3 else DeepseekV2Config)(**d)
    model = (DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("inv_freq",)):
                continue
            p.copy_(_draw(name, tuple(p.shape), g, sigmoid=v3))
    size = None
    if shards > 1:  # about `shards` files of roughly equal size
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        size = f"{max(1, total // shards // 1000 + 1)}KB"
    model.save_pretrained(out, max_shard_size=size) if size else model.save_pretrained(out)
    gen = {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
           "pad_token_id": special.get("pad"), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _draw(name: str, shape: tuple[int, ...], g: torch.Generator, sigmoid: bool) -> torch.Tensor:
    """A parameter's random value by its role (see the module docstring)."""
    def rnd(std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    fan_in = shape[-1]
    if name.endswith("norm.weight") or "layernorm" in name:
        return 1.0 + rnd(0.1)
    if name == "model.embed_tokens.weight":
        return rnd(1.0)
    if name == "lm_head.weight":
        return rnd(4.0 / math.sqrt(fan_in))  # logits std ~ 4
    if name.endswith("e_score_correction_bias"):
        return rnd(0.1)  # large enough to change some selections
    if name.endswith("mlp.gate.weight"):
        # softmax: logits std ~ 3; sigmoid saturates, so a smaller spread keeps scores apart
        return rnd((1.5 if sigmoid else 3.0) / math.sqrt(fan_in))
    if name.endswith(("down_proj", "down_proj.weight", "o_proj.weight")):
        return rnd(0.5 / math.sqrt(fan_in))
    return rnd(1.0 / math.sqrt(fan_in))
