"""Safetensors checkpoint loading, split by role.

The attention side and the expert side each read only the tensors they need, straight from the
(possibly sharded) safetensors files with ``safe_open`` — an attention replica never touches an
expert tensor, an expert node never touches anything but its experts.

Accepted layouts (Hugging Face hub naming):

- Mixtral: ``model.layers.{i}.block_sparse_moe.gate.weight`` and
  ``model.layers.{i}.block_sparse_moe.experts.{j}.{w1,w2,w3}.weight`` (w1 = gate, w3 = up,
  w2 = down).
- Qwen3-MoE: ``model.layers.{i}.mlp.gate.weight`` and
  ``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``; dense layers
  ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``.
- Fused experts (transformers' in-memory layout): ``<moe>.experts.gate_up_proj`` ``[E, 2I, H]``
  and ``<moe>.experts.down_proj`` ``[E, H, I]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from services.core.config import ModelConfig
from services.errors import CheckpointError


@dataclass
class CheckpointIndex:
    """Which file holds which tensor; ``requested`` records every key read (tests use it)."""

    model_dir: Path
    key_to_file: dict[str, Path]
    requested: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, model_dir: str | Path) -> CheckpointIndex:
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({exc})") from None
            return cls(d, {k: d / f for k, f in weight_map.items()})
        single = d / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {d}")
        try:
            with safe_open(str(single), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{single}: not a safetensors file ({exc})") from None
        return cls(d, {k: single for k in keys})

    def has(self, key: str) -> bool:
        return key in self.key_to_file

    def read(self, keys: Iterable[str], dtype: torch.dtype, device: str | torch.device
             ) -> dict[str, torch.Tensor]:
        """Read ``keys`` (grouped per file, one open per file); a missing key names itself."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.key_to_file:
                raise CheckpointError(f"missing tensor {k!r} in {self.model_dir}")
            by_file.setdefault(self.key_to_file[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for path, ks in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for k in ks:
                        self.requested.append(k)
                        out[k] = f.get_tensor(k).to(device=device, dtype=dtype)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None
        return out


def _moe_prefix(cfg: ModelConfig, layer: int) -> str:
    part = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    return f"model.layers.{layer}.{part}"


def _expect(t: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    got = tuple(t[key].shape)
    if got != shape:
        raise CheckpointError(f"tensor {key!r} has shape {list(got)}, expected {list(shape)}")
    return t[key]


# ----------------------------------------------------------------------------- attention side
@dataclass
class AttentionLayerWeights:
    """One decoder layer's attention-side weights (``[out, in]`` like nn.Linear)."""

    input_norm: torch.Tensor  # [H]
    q: torch.Tensor  # [NH*D, H]
    k: torch.Tensor  # [KVH*D, H]
    v: torch.Tensor  # [KVH*D, H]
    o: torch.Tensor  # [H, NH*D]
    post_norm: torch.Tensor  # [H]
    q_norm: torch.Tensor | None = None  # [D] (Qwen3)
    k_norm: torch.Tensor | None = None  # [D]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    router: torch.Tensor | None = None  # [E, H], sparse layers
    dense_gate_up: torch.Tensor | None = None  # [2I, H], dense layers (gate rows, then up rows)
    dense_down: torch.Tensor | None = None  # [H, I]


@dataclass
class AttentionWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[AttentionLayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)


def load_attention_weights(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                           device: str | torch.device, index: CheckpointIndex | None = None
                           ) -> AttentionWeights:
    """Embeddings, norms, attention projections, routers, dense MLPs, final norm and LM head.

    Expert tensors are never read. Pass ``index`` to inspect ``index.requested`` afterwards.
    """
    idx = index or CheckpointIndex.open(model_dir)
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    nq, nkv = cfg.num_heads * D, cfg.num_kv_heads * D
    want: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H),
                                        "model.norm.weight": (H,)}
    tied = cfg.tie_word_embeddings or not idx.has("lm_head.weight")
    if not tied:
        want["lm_head.weight"] = (V, H)
    elif not cfg.tie_word_embeddings:
        raise CheckpointError(f"missing tensor 'lm_head.weight' in {model_dir}")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        want |= {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                 f"{p}.self_attn.q_proj.weight": (nq, H), f"{p}.self_attn.k_proj.weight": (nkv, H),
                 f"{p}.self_attn.v_proj.weight": (nkv, H), f"{p}.self_attn.o_proj.weight": (H, nq)}
        if cfg.attention_bias:
            want |= {f"{p}.self_attn.q_proj.bias": (nq,), f"{p}.self_attn.k_proj.bias": (nkv,),
                     f"{p}.self_attn.v_proj.bias": (nkv,), f"{p}.self_attn.o_proj.bias": (H,)}
        if cfg.qk_norm:
            want |= {f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,)}
        if cfg.sparse_layers[i]:
            want[f"{_moe_prefix(cfg, i)}.gate.weight"] = (cfg.num_experts, H)
        else:
            inter = cfg.dense_intermediate_size
            want |= {f"{p}.mlp.gate_proj.weight": (inter, H), f"{p}.mlp.up_proj.weight": (inter, H),
                     f"{p}.mlp.down_proj.weight": (H, inter)}
    _check_no_unknown(idx, cfg)
    t = idx.read(want, dtype, device)
    for k, shape in want.items():
        _expect(t, k, shape)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        lw = AttentionLayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], q=t[f"{a}.q_proj.weight"],
            k=t[f"{a}.k_proj.weight"], v=t[f"{a}.v_proj.weight"], o=t[f"{a}.o_proj.weight"],
            post_norm=t[f"{p}.post_attention_layernorm.weight"],
            q_norm=t.get(f"{a}.q_norm.weight"), k_norm=t.get(f"{a}.k_norm.weight"),
            q_bias=t.get(f"{a}.q_proj.bias"), k_bias=t.get(f"{a}.k_proj.bias"),
            v_bias=t.get(f"{a}.v_proj.bias"), o_bias=t.get(f"{a}.o_proj.bias"))
        if cfg.sparse_layers[i]:
            lw.router = t[f"{_moe_prefix(cfg, i)}.gate.weight"]
        else:
            lw.dense_gate_up = torch.cat([t[f"{p}.mlp.gate_proj.weight"],
                                          t[f"{p}.mlp.up_proj.weight"]], dim=0)
            lw.dense_down = t[f"{p}.mlp.down_proj.weight"]
        layers.append(lw)
    embed = t["model.embed_tokens.weight"]
    return AttentionWeights(embed=embed, layers=layers, final_norm=t["model.norm.weight"],
                            lm_head=embed if tied else t["lm_head.weight"])


# ----------------------------------------------------------------------------- expert side
@dataclass
class ExpertWeights:
    """Per sparse layer: stacked weights of the held experts, in ``expert_ids`` order."""

    expert_ids: tuple[int, ...]
    gate_up: dict[int, torch.Tensor]  # layer -> [n, 2I, H] (gate rows, then up rows)
    down: dict[int, torch.Tensor]  # layer -> [n, H, I]


_PER_EXPERT = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def load_expert_weights(model_dir: str | Path, cfg: ModelConfig, expert_ids: Iterable[int],
                        dtype: torch.dtype, device: str | torch.device,
                        index: CheckpointIndex | None = None) -> ExpertWeights:
    """For every sparse layer, only the listed experts' gate/up/down projections."""
    ids = tuple(int(e) for e in expert_ids)
    bad = [e for e in ids if not 0 <= e < cfg.num_experts]
    if bad or len(set(ids)) != len(ids):
        raise CheckpointError(f"expert ids must be distinct and in [0, {cfg.num_experts}), "
                              f"got {list(ids)}")
    idx = index or CheckpointIndex.open(model_dir)
    H, inter = cfg.hidden_size, cfg.expert_intermediate_size
    g_name, u_name, d_name = _PER_EXPERT[cfg.family]
    gate_up: dict[int, torch.Tensor] = {}
    down: dict[int, torch.Tensor] = {}
    for layer in cfg.sparse_layer_ids:
        p = f"{_moe_prefix(cfg, layer)}.experts"
        if not ids:
            gate_up[layer] = torch.empty(0, 2 * inter, H, dtype=dtype, device=device)
            down[layer] = torch.empty(0, H, inter, dtype=dtype, device=device)
        elif idx.has(f"{p}.gate_up_proj"):  # fused layout: read whole, keep the wanted slice
            t = idx.read([f"{p}.gate_up_proj", f"{p}.down_proj"], dtype, "cpu")
            gu = _expect(t, f"{p}.gate_up_proj", (cfg.num_experts, 2 * inter, H))
            dn = _expect(t, f"{p}.down_proj", (cfg.num_experts, H, inter))
            sel = torch.tensor(ids)
            gate_up[layer] = gu[sel].contiguous().to(device)
            down[layer] = dn[sel].contiguous().to(device)
        else:
            keys = {}
            for e in ids:
                keys |= {f"{p}.{e}.{g_name}.weight": (inter, H), f"{p}.{e}.{u_name}.weight":
                         (inter, H), f"{p}.{e}.{d_name}.weight": (H, inter)}
            t = idx.read(keys, dtype, device)
            for k, shape in keys.items():
                _expect(t, k, shape)
            gate_up[layer] = torch.stack([torch.cat([t[f"{p}.{e}.{g_name}.weight"],
                                                     t[f"{p}.{e}.{u_name}.weight"]]) for e in ids])
            down[layer] = torch.stack([t[f"{p}.{e}.{d_name}.weight"] for e in ids])
    return ExpertWeights(expert_ids=ids, gate_up=gate_up, down=down)


# ----------------------------------------------------------------------------- validation
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _known_layer_suffix(cfg: ModelConfig, layer: int, rest: str) -> bool:
    attn = {"input_layernorm.weight", "post_attention_layernorm.weight"} | {
        f"self_attn.{n}_proj.{w}" for n in "qkvo" for w in ("weight", "bias")} | {
        "self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    if rest in attn:
        return True
    if not cfg.sparse_layers[layer]:
        return rest in {f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    moe = _moe_prefix(cfg, layer).split(".", 3)[3]
    if rest in (f"{moe}.gate.weight", f"{moe}.experts.gate_up_proj", f"{moe}.experts.down_proj"):
        return True
    m = re.fullmatch(rf"{re.escape(moe)}\.experts\.(\d+)\.(\w+)\.weight", rest)
    return bool(m) and int(m.group(1)) < cfg.num_experts and m.group(2) in _PER_EXPERT[cfg.family]


def _check_no_unknown(idx: CheckpointIndex, cfg: ModelConfig) -> None:
    """An unexpected tensor under a known prefix usually means a config/checkpoint mismatch."""
    for key in idx.key_to_file:
        if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            continue
        m = _LAYER_KEY.match(key)
        if m is None:
            if key.startswith("model."):
                raise CheckpointError(f"unexpected tensor {key!r} in checkpoint")
            continue
        layer = int(m.group(1))
        if layer >= cfg.num_layers or not _known_layer_suffix(cfg, layer, m.group(2)):
            raise CheckpointError(f"unexpected tensor {key!r} in checkpoint (config: "
                                  f"{cfg.num_layers} layers, {cfg.num_experts} experts)")
