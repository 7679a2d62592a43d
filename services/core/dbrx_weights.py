"""DBRX's tensor names and layouts, mapped onto the per-role weights every family uses.

DBRX (``DbrxForCausalLM``) names its tensors after its own modules::

    transformer.wte.weight                                   [V, H]   embeddings
    transformer.blocks.{i}.norm_attn_norm.norm_1.weight      [H]      LayerNorm, no bias
    transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight   [(NH + 2 KVH) * D, H]  q, k, v rows
    transformer.blocks.{i}.norm_attn_norm.attn.out_proj.weight  [H, NH * D]
    transformer.blocks.{i}.norm_attn_norm.norm_2.weight      [H]
    transformer.blocks.{i}.ffn.router.layer.weight           [E, H]
    transformer.blocks.{i}.ffn.experts.mlp.{w1,v1,w2}        [E * I, H] (gate, up, down^T)
    transformer.norm_f.weight, lm_head.weight

The expert tensors hold every expert of a layer in one tensor, so an expert node reads the
layer's three tensors and keeps its experts' rows. ``core/checkpoint.py`` does the reading
and builds its weight classes from what these functions return.
"""

from __future__ import annotations

from typing import Any

import torch

from services.core.config import ModelConfig

EMBED, FINAL_NORM, LM_HEAD = "transformer.wte.weight", "transformer.norm_f.weight", "lm_head.weight"


def _block(i: int) -> str:
    return f"transformer.blocks.{i}"


def attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every attention-side tensor -> its shape (``lm_head`` unless tied)."""
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    want: dict[str, tuple[int, ...]] = {EMBED: (V, H), FINAL_NORM: (H,)}
    if not cfg.tie_word_embeddings:
        want[LM_HEAD] = (V, H)
    for i in range(cfg.num_layers):
        a = f"{_block(i)}.norm_attn_norm"
        want |= {f"{a}.norm_1.weight": (H,), f"{a}.norm_2.weight": (H,),
                 f"{a}.attn.Wqkv.weight": ((cfg.num_heads + 2 * cfg.num_kv_heads) * D, H),
                 f"{a}.attn.out_proj.weight": (H, cfg.num_heads * D),
                 f"{_block(i)}.ffn.router.layer.weight": (cfg.num_experts, H)}
    return want


def expert_keys(layer: int) -> tuple[str, str, str]:
    """(gate w1, up v1, transposed down w2) of one layer, each [E * I, H]."""
    p = f"{_block(layer)}.ffn.experts.mlp"
    return f"{p}.w1", f"{p}.v1", f"{p}.w2"


def known_keys(cfg: ModelConfig) -> set[str]:
    keys = set(attention_shapes(cfg)) | {LM_HEAD}
    for i in range(cfg.num_layers):
        keys |= set(expert_keys(i))
    return keys


def attention_layer(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> dict[str, Any]:
    """Layer ``i``'s AttentionLayerWeights fields from the read tensors ``t``."""
    a = f"{_block(i)}.norm_attn_norm"
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    wqkv = t[f"{a}.attn.Wqkv.weight"]
    return dict(input_norm=t[f"{a}.norm_1.weight"], q=wqkv[:nq], k=wqkv[nq:nq + nkv],
                v=wqkv[nq + nkv:], o=t[f"{a}.attn.out_proj.weight"],
                post_norm=t[f"{a}.norm_2.weight"],
                router=t[f"{_block(i)}.ffn.router.layer.weight"])


def expert_stacks(w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, cfg: ModelConfig,
                  sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's [E * I, H] tensors -> the held experts' (gate_up [n, 2I, H], down [n, H, I])."""
    E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    g, u, d = (w.view(E, inter, H)[sel] for w in (w1, v1, w2))
    return torch.cat((g, u), dim=1).contiguous(), d.transpose(1, 2).contiguous()
