"""DBRX's tensor names, read into the same per-role weights as every other family.

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
layer's three tensors and keeps its experts' rows.
"""

from __future__ import annotations

import torch

from services.core.checkpoint import (
    AttentionLayerWeights,
    AttentionWeights,
    CheckpointIndex,
    ExpertWeights,
    _expect,
)
from services.core.config import ModelConfig
from services.errors import CheckpointError

_BLOCK = "transformer.blocks.{}"
_TOP = ("transformer.wte.weight", "transformer.norm_f.weight", "lm_head.weight")


def _attention_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    H, D = cfg.hidden_size, cfg.head_dim
    b = _BLOCK.format(i)
    return {f"{b}.norm_attn_norm.norm_1.weight": (H,), f"{b}.norm_attn_norm.norm_2.weight": (H,),
            f"{b}.norm_attn_norm.attn.Wqkv.weight": ((cfg.num_heads + 2 * cfg.num_kv_heads) * D,
                                                     H),
            f"{b}.norm_attn_norm.attn.out_proj.weight": (H, cfg.num_heads * D),
            f"{b}.ffn.router.layer.weight": (cfg.num_experts, H)}


def _expert_keys(i: int) -> tuple[str, str, str]:
    p = f"{_BLOCK.format(i)}.ffn.experts.mlp"
    return f"{p}.w1", f"{p}.v1", f"{p}.w2"


def check_no_unknown(idx: CheckpointIndex, cfg: ModelConfig) -> None:
    known = set(_TOP)
    for i in range(cfg.num_layers):
        known |= set(_attention_shapes(cfg, i)) | set(_expert_keys(i))
    for key in idx.key_to_file:
        if key not in known and key.startswith("transformer."):
            raise CheckpointError(f"unexpected tensor {key!r} in checkpoint (config: "
                                  f"{cfg.num_layers} layers, {cfg.num_experts} experts)")


def load_attention_weights(idx: CheckpointIndex, cfg: ModelConfig, dtype: torch.dtype,
                           device: str | torch.device) -> AttentionWeights:
    H, V = cfg.hidden_size, cfg.vocab_size
    want: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, H),
                                        "transformer.norm_f.weight": (H,)}
    tied = cfg.tie_word_embeddings
    if not tied:
        want["lm_head.weight"] = (V, H)
    for i in range(cfg.num_layers):
        want |= _attention_shapes(cfg, i)
    check_no_unknown(idx, cfg)
    t = idx.read(want, dtype, device)
    for k, shape in want.items():
        _expect(t, k, shape)
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = []
    for i in range(cfg.num_layers):
        a = f"{_BLOCK.format(i)}.norm_attn_norm"
        wqkv = t[f"{a}.attn.Wqkv.weight"]
        layers.append(AttentionLayerWeights(
            input_norm=t[f"{a}.norm_1.weight"], q=wqkv[:nq], k=wqkv[nq:nq + nkv],
            v=wqkv[nq + nkv:], o=t[f"{a}.attn.out_proj.weight"], post_norm=t[f"{a}.norm_2.weight"],
            router=t[f"{_BLOCK.format(i)}.ffn.router.layer.weight"]))
    embed = t["transformer.wte.weight"]
    return AttentionWeights(embed=embed, layers=layers, final_norm=t["transformer.norm_f.weight"],
                            lm_head=embed if tied else t["lm_head.weight"])


def load_expert_weights(idx: CheckpointIndex, cfg: ModelConfig, ids: tuple[int, ...],
                        dtype: torch.dtype, device: str | torch.device) -> ExpertWeights:
    E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    gate_up: dict[int, torch.Tensor] = {}
    down: dict[int, torch.Tensor] = {}
    sel = torch.tensor(ids, dtype=torch.int64)
    for layer in cfg.sparse_layer_ids:
        keys = _expert_keys(layer)
        t = idx.read(keys, dtype, "cpu")
        w1, v1, w2 = (_expect(t, k, (E * inter, H)).view(E, inter, H)[sel] for k in keys)
        gate_up[layer] = torch.cat((w1, v1), dim=1).contiguous().to(device)  # [n, 2I, H]
        down[layer] = w2.transpose(1, 2).contiguous().to(device)  # [n, H, I]
    return ExpertWeights(expert_ids=ids, gate_up=gate_up, down=down)
