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
- DeepSeek-V2/V3: MLA ``self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj},
  kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj``; MoE as Qwen3-MoE plus
  ``mlp.gate.e_score_correction_bias`` (V3) and ``mlp.shared_experts.{gate,up,down}_proj``;
  MTP modules (``model.layers.{num_hidden_layers + i}.*``) are skipped with a log line.
- Block-FP8 (``quantization_config``, services/core/quant.py): a float8 weight with a
  ``*.weight_scale_inv`` companion is dequantized as it is read.
- Qwen2-MoE / OLMoE / GLM-4.5 (services/core/families.py): as Qwen3-MoE; Qwen2-MoE's shared
  expert is ``mlp.shared_expert.{gate,up,down}_proj`` plus ``mlp.shared_expert_gate.weight``
  ``[1, H]``; GLM's are DeepSeek's ``mlp.shared_experts.*`` and
  ``mlp.gate.e_score_correction_bias``; OLMoE's q/k norms span the whole projection.
- MiniMax-M2: Mixtral's names plus ``block_sparse_moe.e_score_correction_bias``.
- gpt-oss: ``self_attn.sinks`` ``[NH]``, ``mlp.router.{weight,bias}``, and fused experts
  ``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` (input-major, gate/up columns interleaved),
  ``gate_up_proj_bias`` ``[E, 2I]``, ``down_proj`` ``[E, I, H]``, ``down_proj_bias`` ``[E, H]``.
- DBRX: ``transformer.*`` names, fused ``Wqkv`` and all experts of a layer in one tensor
  (services/core/dbrx_weights.py).
- Fused experts (transformers' in-memory layout): ``<moe>.experts.gate_up_proj`` ``[E, 2I, H]``
  and ``<moe>.experts.down_proj`` ``[E, H, I]``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from services.core import dbrx_weights, mxfp4, quant
from services.core.config import MLA_FAMILIES, ModelConfig
from services.errors import CheckpointError, ConfigError

log = logging.getLogger("megascale.core.checkpoint")


@dataclass
class CheckpointIndex:
    """Which file holds which tensor; ``requested`` records every key read (tests use it)."""

    model_dir: Path
    key_to_file: dict[str, Path]
    requested: list[str] = field(default_factory=list)
    # block-FP8 format from config.json (None: weights are read as stored)
    quant: quant.FP8BlockSpec | None = None

    @classmethod
    def open(cls, model_dir: str | Path) -> CheckpointIndex:
        index = cls._open(Path(model_dir))
        index.quant = _quant_spec(index.model_dir)
        return index

    @classmethod
    def _open(cls, d: Path) -> CheckpointIndex:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({exc})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map must be an object")
            missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]!r} is missing")
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
                        t = f.get_tensor(k)
                        if t.dtype == torch.float8_e4m3fn or t.dtype == torch.float8_e5m2:
                            t = self._dequantize(k, t, dtype)
                        out[k] = t.to(device=device, dtype=dtype)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None
        return out

    def _dequantize(self, key: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A float8 tensor -> ``dtype`` through its ``*_scale_inv`` companion (on CPU)."""
        scale_key = key + quant.SCALE_SUFFIX
        if self.quant is None:
            raise CheckpointError(f"tensor {key!r} is {weight.dtype} but config.json has no "
                                  "quantization_config")
        if scale_key not in self.key_to_file:
            raise CheckpointError(f"tensor {key!r} is {weight.dtype} but {scale_key!r} is "
                                  "missing")
        with safe_open(str(self.key_to_file[scale_key]), framework="pt", device="cpu") as f:
            scale = f.get_tensor(scale_key)
        self.requested.append(scale_key)
        try:
            return quant.dequantize(weight, scale, self.quant, dtype, key)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None


def _quant_spec(model_dir: Path) -> quant.FP8BlockSpec | None:
    """The checkpoint's quantization_config (ModelConfig validates the rest of config.json)."""
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or mxfp4.is_mxfp4(data):  # MXFP4: read by _gpt_oss_experts
        return None
    try:
        return quant.parse_quantization_config(data)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def _is_mtp_key(cfg: ModelConfig, layer: int) -> bool:
    """DeepSeek's multi-token-prediction modules sit after the decoder layers."""
    return cfg.num_layers <= layer < cfg.num_layers + cfg.mtp_layers


def _moe_prefix(cfg: ModelConfig, layer: int) -> str:
    part = "block_sparse_moe" if cfg.family in ("mixtral", "minimax_m2") else "mlp"
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
    q: torch.Tensor | None  # [NH*D, H] (None for MLA, which has ``mla``)
    k: torch.Tensor | None  # [KVH*D, H]
    v: torch.Tensor | None  # [KVH*D, H]
    o: torch.Tensor  # [H, NH*D] (MLA: [H, NH*v_head_dim])
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
    mla: MLALayerWeights | None = None
    router_bias: torch.Tensor | None = None  # [E] float32 e_score_correction_bias (V3)
    shared_gate_up: torch.Tensor | None = None  # [2S, H] shared experts, run on this side
    shared_down: torch.Tensor | None = None  # [H, S]
    shared_gate: torch.Tensor | None = None  # [1, H] sigmoid gate of the shared expert (Qwen2)
    sinks: torch.Tensor | None = None  # [NH] attention sink logits (gpt-oss)


@dataclass
class MLALayerWeights:
    """Multi-head latent attention projections (``[out, in]``); C = kv_lora_rank,
    R = qk_rope_head_dim, Q = q_lora_rank, NH heads of qk = nope + R and v dims."""

    kv_a: torch.Tensor  # [C + R, H] (latent, then the shared rope key)
    kv_a_norm: torch.Tensor  # [C]
    kv_b: torch.Tensor  # [NH * (nope + v), C]
    q: torch.Tensor | None = None  # [NH * qk, H] when q_lora_rank is null
    q_a: torch.Tensor | None = None  # [Q, H]
    q_a_norm: torch.Tensor | None = None  # [Q]
    q_b: torch.Tensor | None = None  # [NH * qk, Q]
    # (W_uk [NH, nope, C], W_uv^T [NH, C, v]) for absorbed decode, made on first use (mla.py)
    absorbed: tuple[torch.Tensor, torch.Tensor] | None = None


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
    if cfg.family == "dbrx":  # its own tensor names
        return _dbrx_attention(idx, cfg, dtype, device)
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
        want |= {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)}
        if cfg.mla is not None:
            want |= _mla_shapes(cfg, f"{p}.self_attn")
        else:
            want |= {f"{p}.self_attn.q_proj.weight": (nq, H),
                     f"{p}.self_attn.k_proj.weight": (nkv, H),
                     f"{p}.self_attn.v_proj.weight": (nkv, H),
                     f"{p}.self_attn.o_proj.weight": (H, nq)}
        if cfg.attention_bias:
            want |= {f"{p}.self_attn.q_proj.bias": (nq,), f"{p}.self_attn.k_proj.bias": (nkv,),
                     f"{p}.self_attn.v_proj.bias": (nkv,)}
        if cfg.attention_bias if cfg.o_proj_bias is None else cfg.o_proj_bias:
            want[f"{p}.self_attn.o_proj.bias"] = (H,)
        if cfg.attention_sinks:
            want[f"{p}.self_attn.sinks"] = (cfg.num_heads,)
        if cfg.qk_norm:
            qn, kn = (nq, nkv) if cfg.qk_norm_full_width else (D, D)
            want |= {f"{p}.self_attn.q_norm.weight": (qn,), f"{p}.self_attn.k_norm.weight": (kn,)}
        if cfg.sparse_layers[i]:
            want[_router_key(cfg, i)] = (cfg.num_experts, H)
            if cfg.router_spec.score_bias or cfg.router_spec.logit_bias:
                want[_router_bias_key(cfg, i)] = (cfg.num_experts,)
            if S := cfg.shared_expert_intermediate_size:
                s = f"{p}.mlp.{_shared_name(cfg)}"
                want |= {f"{s}.gate_proj.weight": (S, H), f"{s}.up_proj.weight": (S, H),
                         f"{s}.down_proj.weight": (H, S)}
                if cfg.shared_expert_gate:
                    want[f"{p}.mlp.shared_expert_gate.weight"] = (1, H)
        else:
            inter = cfg.dense_intermediate_size
            want |= {f"{p}.mlp.gate_proj.weight": (inter, H), f"{p}.mlp.up_proj.weight": (inter, H),
                     f"{p}.mlp.down_proj.weight": (H, inter)}
    _check_no_unknown(idx, cfg)
    bias_keys = [k for k in want if k.endswith("e_score_correction_bias")]
    t = idx.read([k for k in want if k not in bias_keys], dtype, device)
    # the selection bias stays float32 whatever the compute dtype (transformers keeps it so)
    t |= idx.read(bias_keys, torch.float32, device)
    for k, shape in want.items():
        _expect(t, k, shape)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        lw = AttentionLayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], q=t.get(f"{a}.q_proj.weight"),
            k=t.get(f"{a}.k_proj.weight"), v=t.get(f"{a}.v_proj.weight"),
            o=t[f"{a}.o_proj.weight"],
            post_norm=t[f"{p}.post_attention_layernorm.weight"],
            q_norm=t.get(f"{a}.q_norm.weight"), k_norm=t.get(f"{a}.k_norm.weight"),
            q_bias=t.get(f"{a}.q_proj.bias"), k_bias=t.get(f"{a}.k_proj.bias"),
            v_bias=t.get(f"{a}.v_proj.bias"), o_bias=t.get(f"{a}.o_proj.bias"),
            sinks=t.get(f"{a}.sinks"))
        if cfg.mla is not None:
            lw.q = None
            lw.mla = MLALayerWeights(
                kv_a=t[f"{a}.kv_a_proj_with_mqa.weight"], kv_a_norm=t[f"{a}.kv_a_layernorm.weight"],
                kv_b=t[f"{a}.kv_b_proj.weight"], q=t.get(f"{a}.q_proj.weight"),
                q_a=t.get(f"{a}.q_a_proj.weight"), q_a_norm=t.get(f"{a}.q_a_layernorm.weight"),
                q_b=t.get(f"{a}.q_b_proj.weight"))
        if cfg.sparse_layers[i]:
            lw.router = t[_router_key(cfg, i)]
            lw.router_bias = t.get(_router_bias_key(cfg, i))
            if cfg.shared_expert_intermediate_size:
                s = f"{p}.mlp.{_shared_name(cfg)}"
                lw.shared_gate = t.get(f"{p}.mlp.shared_expert_gate.weight")
                lw.shared_gate_up = torch.cat([t[f"{s}.gate_proj.weight"],
                                               t[f"{s}.up_proj.weight"]], dim=0)
                lw.shared_down = t[f"{s}.down_proj.weight"]
        else:
            lw.dense_gate_up = torch.cat([t[f"{p}.mlp.gate_proj.weight"],
                                          t[f"{p}.mlp.up_proj.weight"]], dim=0)
            lw.dense_down = t[f"{p}.mlp.down_proj.weight"]
        layers.append(lw)
    embed = t["model.embed_tokens.weight"]
    return AttentionWeights(embed=embed, layers=layers, final_norm=t["model.norm.weight"],
                            lm_head=embed if tied else t["lm_head.weight"])


def _router_key(cfg: ModelConfig, layer: int) -> str:
    if cfg.family == "gpt_oss":
        return f"model.layers.{layer}.mlp.router.weight"
    return f"{_moe_prefix(cfg, layer)}.gate.weight"


def _router_bias_key(cfg: ModelConfig, layer: int) -> str:
    """The selection bias: on the gate (DeepSeek-V3, GLM) or on the MoE block (MiniMax-M2);
    gpt-oss's logit bias."""
    if cfg.family == "gpt_oss":
        return f"model.layers.{layer}.mlp.router.bias"
    if cfg.family == "minimax_m2":
        return f"{_moe_prefix(cfg, layer)}.e_score_correction_bias"
    return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


def _shared_name(cfg: ModelConfig) -> str:
    """The shared-expert module's name: Qwen2-MoE has one, DeepSeek/GLM a (fused) plural."""
    return "shared_expert" if cfg.family == "qwen2_moe" else "shared_experts"


def _mla_shapes(cfg: ModelConfig, a: str) -> dict[str, tuple[int, ...]]:
    m, H, NH = cfg.mla, cfg.hidden_size, cfg.num_heads
    assert m is not None
    want = {f"{a}.kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, H),
            f"{a}.kv_a_layernorm.weight": (m.kv_lora_rank,),
            f"{a}.kv_b_proj.weight": (NH * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
            f"{a}.o_proj.weight": (H, NH * m.v_head_dim)}
    if m.q_lora_rank is None:
        want[f"{a}.q_proj.weight"] = (NH * m.qk_head_dim, H)
    else:
        want |= {f"{a}.q_a_proj.weight": (m.q_lora_rank, H),
                 f"{a}.q_a_layernorm.weight": (m.q_lora_rank,),
                 f"{a}.q_b_proj.weight": (NH * m.qk_head_dim, m.q_lora_rank)}
    return want


# ----------------------------------------------------------------------------- expert side
@dataclass
class ExpertWeights:
    """Per sparse layer: stacked weights of the held experts, in ``expert_ids`` order."""

    expert_ids: tuple[int, ...]
    gate_up: dict[int, torch.Tensor]  # layer -> [n, 2I, H] (gate rows, then up rows)
    down: dict[int, torch.Tensor]  # layer -> [n, H, I]
    # expert biases (gpt-oss): layer -> [n, 2I] (gate, then up) and [n, H]
    gate_up_bias: dict[int, torch.Tensor] = field(default_factory=dict)
    down_bias: dict[int, torch.Tensor] = field(default_factory=dict)


_PER_EXPERT = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
               "deepseek_v2": ("gate_proj", "up_proj", "down_proj"),
               "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
               "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
               "olmoe": ("gate_proj", "up_proj", "down_proj"),
               "glm4_moe": ("gate_proj", "up_proj", "down_proj"),
               "minimax_m2": ("w1", "w3", "w2")}


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
    if cfg.family == "dbrx":
        return _dbrx_experts(idx, cfg, ids, dtype, device)
    if cfg.family == "gpt_oss":
        return _gpt_oss_experts(idx, cfg, ids, dtype, device)
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


def _dbrx_attention(idx: CheckpointIndex, cfg: ModelConfig, dtype: torch.dtype,
                    device: str | torch.device) -> AttentionWeights:
    want = dbrx_weights.attention_shapes(cfg)
    known = dbrx_weights.known_keys(cfg)
    for key in idx.key_to_file:
        if key.startswith("transformer.") and key not in known:
            raise CheckpointError(f"unexpected tensor {key!r} in checkpoint (config: "
                                  f"{cfg.num_layers} layers, {cfg.num_experts} experts)")
    t = idx.read(want, dtype, device)
    for k, shape in want.items():
        _expect(t, k, shape)
    layers = [AttentionLayerWeights(**dbrx_weights.attention_layer(t, cfg, i))
              for i in range(cfg.num_layers)]
    embed = t[dbrx_weights.EMBED]
    return AttentionWeights(embed=embed, layers=layers, final_norm=t[dbrx_weights.FINAL_NORM],
                            lm_head=embed if cfg.tie_word_embeddings else t[dbrx_weights.LM_HEAD])


def _dbrx_experts(idx: CheckpointIndex, cfg: ModelConfig, ids: tuple[int, ...],
                  dtype: torch.dtype, device: str | torch.device) -> ExpertWeights:
    shape = (cfg.num_experts * cfg.expert_intermediate_size, cfg.hidden_size)
    sel = torch.tensor(ids, dtype=torch.int64)
    out = ExpertWeights(expert_ids=ids, gate_up={}, down={})
    for layer in cfg.sparse_layer_ids:
        keys = dbrx_weights.expert_keys(layer)
        t = idx.read(keys, dtype, "cpu")
        gate_up, down = dbrx_weights.expert_stacks(*(_expect(t, k, shape) for k in keys), cfg,
                                                   sel)
        out.gate_up[layer], out.down[layer] = gate_up.to(device), down.to(device)
    return out


_GPT_OSS_EXPERTS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def _gpt_oss_experts(idx: CheckpointIndex, cfg: ModelConfig, ids: tuple[int, ...],
                     dtype: torch.dtype, device: str | torch.device) -> ExpertWeights:
    """gpt-oss's fused expert tensors -> the common layout (gate/up de-interleaved)."""
    from services.core.gpt_oss import deinterleave

    E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    shapes = {"gate_up_proj": (E, H, 2 * inter), "gate_up_proj_bias": (E, 2 * inter),
              "down_proj": (E, inter, H), "down_proj_bias": (E, H)}
    sel = torch.tensor(ids, dtype=torch.int64)
    out = ExpertWeights(expert_ids=ids, gate_up={}, down={})
    for layer in cfg.sparse_layer_ids:
        p = f"model.layers.{layer}.mlp.experts"
        if cfg.mxfp4:
            gu, gub, dn, dnb = _gpt_oss_mxfp4(idx, p, shapes, sel, dtype)
        else:
            t = idx.read([f"{p}.{n}" for n in _GPT_OSS_EXPERTS], dtype, "cpu")
            gu, gub, dn, dnb = (_expect(t, f"{p}.{n}", shapes[n])[sel]
                                for n in _GPT_OSS_EXPERTS)
        # [n, H, 2I] interleaved -> [n, 2I, H] as [gate rows | up rows]
        out.gate_up[layer] = deinterleave(gu, 2).transpose(1, 2).contiguous().to(device)
        out.gate_up_bias[layer] = deinterleave(gub, 1).contiguous().to(device)
        out.down[layer] = dn.transpose(1, 2).contiguous().to(device)  # [n, H, I]
        out.down_bias[layer] = dnb.contiguous().to(device)
    return out


def _gpt_oss_mxfp4(idx: CheckpointIndex, p: str, shapes: dict[str, tuple[int, ...]],
                   sel: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The held experts' (gate_up [n, H, 2I], its bias, down [n, I, H], its bias) from MXFP4
    ``*_blocks`` / ``*_scales`` (stored out-major), dequantized on CPU."""
    out = []
    for name in _GPT_OSS_EXPERTS:
        shape = shapes[name]
        if name.endswith("_bias"):
            out.append(_expect(idx.read([f"{p}.{name}"], dtype, "cpu"), f"{p}.{name}",
                               shape)[sel])
            continue
        E, cols, rows = shape  # input-major [E, in, out]; stored out-major in 32-blocks
        keys = [f"{p}.{name}_blocks", f"{p}.{name}_scales"]
        raw = idx.read(keys, torch.uint8, "cpu")
        blocks = _expect(raw, keys[0], (E, rows, cols // mxfp4.BLOCK, mxfp4.BLOCK // 2))[sel]
        scales = _expect(raw, keys[1], (E, rows, cols // mxfp4.BLOCK))[sel]
        try:
            w = mxfp4.dequantize(blocks, scales, dtype, f"{p}.{name}")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        out.append(w.transpose(1, 2))  # [n, in, out], as the unquantized tensor
    return tuple(out)


# ----------------------------------------------------------------------------- validation
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


_MLA_SUFFIXES = {f"self_attn.{n}.weight" for n in (
    "q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
    "kv_b_proj", "o_proj")}


def _known_layer_suffix(cfg: ModelConfig, layer: int, rest: str) -> bool:
    if cfg.quantization is not None and rest.endswith(".weight" + quant.SCALE_SUFFIX):
        rest = rest[:-len(quant.SCALE_SUFFIX)]
    attn = {"input_layernorm.weight", "post_attention_layernorm.weight"}
    if cfg.family in MLA_FAMILIES:
        attn |= _MLA_SUFFIXES
    else:
        attn |= {f"self_attn.{n}_proj.{w}" for n in "qkvo" for w in ("weight", "bias")} | {
            "self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    if cfg.attention_sinks:
        attn.add("self_attn.sinks")
    if rest in attn:
        return True
    if not cfg.sparse_layers[layer]:
        return rest in {f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    moe = _moe_prefix(cfg, layer).split(".", 3)[3]
    if rest in (f"{moe}.gate.weight", f"{moe}.experts.gate_up_proj", f"{moe}.experts.down_proj"):
        return True
    if cfg.family == "gpt_oss":
        experts = {f"mlp.experts.{n}" for n in _GPT_OSS_EXPERTS}
        if cfg.mxfp4:
            experts = {f"mlp.experts.{n}{s}" for n in ("gate_up_proj", "down_proj")
                       for s in ("_blocks", "_scales")} | {
                f"mlp.experts.{n}_bias" for n in ("gate_up_proj", "down_proj")}
        return rest in {"mlp.router.weight", "mlp.router.bias"} | experts
    mla = cfg.family in MLA_FAMILIES
    if (mla or cfg.router_spec.score_bias) and f"model.layers.{layer}.{rest}" == (
            _router_bias_key(cfg, layer)):
        return True
    if (mla or cfg.shared_expert_intermediate_size) and rest in (
            {f"mlp.{_shared_name(cfg)}.{n}_proj.weight" for n in ("gate", "up", "down")}
            | ({"mlp.shared_expert_gate.weight"} if cfg.shared_expert_gate else set())):
        return True
    m = re.fullmatch(rf"{re.escape(moe)}\.experts\.(\d+)\.(\w+)\.weight", rest)
    return bool(m) and int(m.group(1)) < cfg.num_experts and m.group(2) in _PER_EXPERT[cfg.family]


def _check_no_unknown(idx: CheckpointIndex, cfg: ModelConfig) -> None:
    """An unexpected tensor under a known prefix usually means a config/checkpoint mismatch.
    MTP modules are expected and skipped (this engine does not speculate)."""
    mtp = 0
    for key in idx.key_to_file:
        if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            continue
        m = _LAYER_KEY.match(key)
        if m is None:
            if key.startswith("model."):
                raise CheckpointError(f"unexpected tensor {key!r} in checkpoint")
            continue
        layer = int(m.group(1))
        if _is_mtp_key(cfg, layer):
            mtp += 1
            continue
        if layer >= cfg.num_layers or not _known_layer_suffix(cfg, layer, m.group(2)):
            raise CheckpointError(f"unexpected tensor {key!r} in checkpoint (config: "
                                  f"{cfg.num_layers} layers, {cfg.num_experts} experts)")
    if mtp:
        log.info("skipping %d multi-token-prediction (MTP) tensors of %d module(s) in %s: "
                 "not used for serving", mtp, cfg.mtp_layers, idx.model_dir)
