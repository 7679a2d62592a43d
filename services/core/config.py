"""Model configuration: one normalised field set for every supported MoE family.

:class:`ModelConfig` is read from a Hugging Face ``config.json`` (see ``ARCHITECTURES``) and is
the only description of the model the rest of the code sees. Field names follow the serving
vocabulary (``num_layers``, ``top_k``, ...), not any one family's spelling. Also here: the RoPE
inverse-frequency computation for the scaling types these families' configs use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.core.families import (
    GQA_FAMILIES,
    family_fields,
    flatten_dbrx,
    partial_rotary_factor,
)
from services.core.mxfp4 import is_mxfp4
from services.core.quant import FP8BlockSpec, parse_quantization_config
from services.core.routing import RouterSpec
from services.errors import ConfigError

# architecture name in config.json -> family
ARCHITECTURES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "OlmoeForCausalLM": "olmoe",
    "Glm4MoeForCausalLM": "glm4_moe",
    "DbrxForCausalLM": "dbrx",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "GptOssForCausalLM": "gpt_oss",
}
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")
# Known architectures whose attention we do not implement: a one-line error, not a wrong answer.
UNSUPPORTED_ARCHITECTURES: dict[str, str] = {
    "DeepseekV32ForCausalLM": "DeepSeek-V3.2's sparse attention indexer (index_topk)",
    "DeepseekV4ForCausalLM": "DeepSeek-V4's compressed attention (compress_rates)",
}
# Keys that mark such a variant inside an otherwise supported config.
UNSUPPORTED_KEYS: dict[str, str] = {
    "index_topk": "DeepSeek-V3.2's sparse attention indexer",
    "index_n_heads": "DeepSeek-V3.2's sparse attention indexer",
    "compress_rates": "DeepSeek-V4's compressed attention",
    "compress_ratios": "DeepSeek-V4's compressed attention",
    "use_mtp": "multi-token-prediction (MTP) speculative decoding",
    "speculative_config": "speculative decoding (MTP layers)",
}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3) shapes and score scale.

    Per token the KV cache holds ``kv_lora_rank`` latent values (after ``kv_a_layernorm``) and
    one ``qk_rope_head_dim`` rotated key shared by every head: ``cache_dim`` numbers per layer.
    ``q_lora_rank`` None means a plain ``q_proj`` (V2-Lite). ``rope_interleave``: the rope dims
    come as (even, odd) pairs (V2 always, V3 by default) rather than two halves.
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    softmax_scale: float

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int)
                                             or self.q_lora_rank < 1):
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got "
                              f"{self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _freeze(value: Any) -> Any:
    """Dicts/lists from JSON -> hashable tuples, so the config stays frozen and hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Normalised MoE decoder config. ``sparse_layers[i]`` is True when layer i is an MoE layer.

    ``rope_scaling`` is a sorted tuple of (key, value) pairs (``None`` for plain RoPE); use
    :meth:`rope_params` for a dict. ``eos_token_ids`` is always a tuple.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    dense_intermediate_size: int
    sparse_layers: tuple[bool, ...]
    norm_topk_prob: bool
    qk_norm: bool
    # Gate weights kept in float32 after the router (Mixtral in transformers) instead of
    # rounded to the compute dtype (Qwen3-MoE): it changes bf16 results by an ulp.
    router_weights_float32: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    sliding_window: int | None = None
    attention_bias: bool = False
    # DeepSeek family: MLA attention, the router variant, shared experts (their summed width,
    # moe_intermediate_size * n_shared_experts; 0 = none), MTP modules whose weights are
    # skipped, and the block-FP8 format of the checkpoint (dequantized at load).
    mla: MLASpec | None = None
    routing: RouterSpec | None = None
    shared_expert_intermediate_size: int = 0
    mtp_layers: int = 0
    quantization: FP8BlockSpec | None = None
    # services/core/families.py: o_proj bias (None: as attention_bias); shared expert output
    # scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE); q/k norm over the whole projection
    # instead of per head (OLMoE, MiniMax-M2); q/k/v clamped to +-clip_qkv (OLMoE, DBRX); RoPE
    # on the first rotary_dim dims of each head only (GLM, MiniMax-M2; None: all head_dim).
    o_proj_bias: bool | None = None
    shared_expert_gate: bool = False
    qk_norm_full_width: bool = False
    clip_qkv: float | None = None
    rotary_dim: int | None = None
    # "rms": RMSNorm; "layer": LayerNorm without bias (DBRX), both with eps rms_norm_eps
    norm_type: str = "rms"
    # gpt-oss (services/core/gpt_oss.py; Qwen2-MoE's windows too): layers with window_layers[i]
    # attend to the last layer_window positions (the step's batch mask, sliding_window, stays
    # full); per-head attention sinks; expert biases and the clamped SwiGLU (swiglu_limit
    # None: plain SwiGLU).
    window_layers: tuple[bool, ...] = ()
    layer_window: int | None = None
    attention_sinks: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # expert weights stored as MXFP4 blocks/scales (gpt-oss), dequantized at load
    mxfp4: bool = False

    def __post_init__(self) -> None:
        if self.family not in ARCHITECTURES.values():
            raise ConfigError(f"family: unknown model family {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "top_k", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.top_k}) must be <= number of experts "
                f"({self.num_experts})")
        if len(self.sparse_layers) != self.num_layers:
            raise ConfigError(f"sparse_layers has {len(self.sparse_layers)} entries, "
                              f"expected num_layers={self.num_layers}")
        if any(self.sparse_layers) and self.expert_intermediate_size < 1:
            raise ConfigError("expert intermediate size must be a positive integer")
        if not all(self.sparse_layers) and self.dense_intermediate_size < 1:
            raise ConfigError("intermediate_size must be a positive integer for dense layers")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.routing is not None and (self.routing.num_experts, self.routing.top_k) != (
                self.num_experts, self.top_k):
            raise ConfigError("routing: num_experts/top_k differ from the model's")
        if (self.mla is not None) != (self.family in MLA_FAMILIES):
            raise ConfigError(f"mla: {self.family} {'has' if self.mla is None else 'has no'} "
                              "multi-head latent attention")
        if self.shared_expert_intermediate_size < 0:
            raise ConfigError("n_shared_experts must be >= 0")
        if self.rotary_dim is not None and not (
                0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"partial_rotary_factor gives {self.rotary_dim} rotary dims of "
                              f"head_dim {self.head_dim}: must be even and in (0, head_dim]")
        if self.window_layers and len(self.window_layers) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.window_layers)} entries, expected "
                              f"num_hidden_layers={self.num_layers}")
        if any(self.window_layers) and (self.layer_window or 0) < 1:
            raise ConfigError("sliding_window must be >= 1 for sliding_attention layers")
        if self.norm_type not in ("rms", "layer"):
            raise ConfigError(f"norm_type must be 'rms' or 'layer', got {self.norm_type!r}")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError(f"clip_qkv must be > 0, got {self.clip_qkv}")
        params = self.rope_params()
        if params is not None:
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling.rope_type {kind!r} is not supported "
                                  f"(supported: {', '.join(ROPE_TYPES)})")
            if kind != "default" and "factor" not in params:
                raise ConfigError(f"rope_scaling.factor is required for rope_type {kind!r}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``model_dir/config.json``; a missing or unparsable file is a ConfigError."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"config.json not found in {model_dir}")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Normalise a Hugging Face config dict (the spelling of any family in
        ``ARCHITECTURES``) to ModelConfig."""
        archs = d.get("architectures") or []
        for a in archs:
            if a in UNSUPPORTED_ARCHITECTURES:
                raise ConfigError(f"architectures: {a} is not supported "
                                  f"({UNSUPPORTED_ARCHITECTURES[a]})")
        for key, what in UNSUPPORTED_KEYS.items():
            if d.get(key) not in (None, False):
                raise ConfigError(f"{key}: {what} is not supported")
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise ConfigError(f"architectures: unsupported {archs!r} (supported: "
                              f"{', '.join(ARCHITECTURES)})")
        if family == "dbrx":
            d = flatten_dbrx(d)

        def req(name: str) -> Any:
            if d.get(name) is None:
                raise ConfigError(f"config field {name!r} is missing")
            return d[name]

        hidden, heads = req("hidden_size"), req("num_attention_heads")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
                raise ConfigError("hidden_size and num_attention_heads must be integers")
            if hidden % heads:
                raise ConfigError(f"hidden_size ({hidden}) must be divisible by "
                                  f"num_attention_heads ({heads}) when head_dim is absent")
            head_dim = hidden // heads
        num_layers = req("num_hidden_layers")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"num_hidden_layers must be a positive integer, got {num_layers!r}")
        num_experts = d.get("num_local_experts", d.get("num_experts", d.get("n_routed_experts")))
        if num_experts is None:
            raise ConfigError("config field 'num_local_experts' (or 'num_experts') is missing")
        mxfp4 = is_mxfp4(d)  # gpt-oss's format (services/core/mxfp4.py), not parsed as FP8
        if mxfp4 and family != "gpt_oss":
            raise ConfigError(f"quantization_config.quant_method: mxfp4 is supported for "
                              f"gpt_oss only, not {family}")
        extra: dict[str, Any] = {"quantization": None if mxfp4 else parse_quantization_config(d),
                                 "mxfp4": mxfp4}
        kv_heads = d.get("num_key_value_heads") or heads

        if family in MLA_FAMILIES:
            sparse, expert_inter, dense_inter, ds = _deepseek_fields(d, family, num_layers,
                                                                     num_experts)
            extra |= ds
            head_dim = extra["mla"].qk_rope_head_dim  # the RoPE dim, as transformers sets it
            kv_heads = heads  # unused by MLA (one latent per token); keeps GQA checks trivial
            norm_topk, qk_norm, bias, window = extra["routing"].norm_topk_prob, False, False, None
        elif family in GQA_FAMILIES:
            fam = family_fields(family, d, num_layers, num_experts)
            sparse = fam.pop("sparse_layers")
            expert_inter = fam.pop("expert_intermediate_size")
            dense_inter = fam.pop("dense_intermediate_size")
            norm_topk, qk_norm = fam.pop("norm_topk_prob"), fam.pop("qk_norm")
            bias, window = fam.pop("attention_bias"), None
            extra |= fam
        elif family == "mixtral":
            sparse = tuple(True for _ in range(num_layers))
            expert_inter, dense_inter = req("intermediate_size"), 0
            norm_topk, qk_norm, bias = True, False, False
            window = d.get("sliding_window")
        else:
            step = d.get("decoder_sparse_step", 1) or 1
            mlp_only = set(d.get("mlp_only_layers") or [])
            sparse = tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0
                           for i in range(num_layers))
            expert_inter = req("moe_intermediate_size")
            dense_inter = d.get("intermediate_size") or 0
            norm_topk, qk_norm = bool(d.get("norm_topk_prob", False)), True
            bias = bool(d.get("attention_bias", False))
            window = d.get("sliding_window") if d.get("use_sliding_window") else None

        # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; 4.x wrote
        # rope_theta + rope_scaling at top level. Accept both.
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling")
        if isinstance(legacy, dict):
            rope = {**legacy, **rope}
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        if family in GQA_FAMILIES:
            factor = partial_rotary_factor(family, d, rope)
            rope.pop("partial_rotary_factor", None)
            if factor != 1:
                extra["rotary_dim"] = int(head_dim * factor)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type", "default") == "default" and set(rope) <= {"rope_type"}:
            rope_scaling = None
        else:
            rope_scaling = _freeze(rope)

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            family=family,
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            num_experts=num_experts,
            top_k=req("num_experts_per_tok"),
            expert_intermediate_size=expert_inter,
            dense_intermediate_size=dense_inter,
            sparse_layers=sparse,
            norm_topk_prob=norm_topk,
            qk_norm=qk_norm,
            router_weights_float32=family == "mixtral",
            rms_norm_eps=float(extra.pop("rms_norm_eps", d.get("rms_norm_eps", 1e-6))),
            rope_theta=float(theta),
            max_position_embeddings=req("max_position_embeddings"),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=window,
            attention_bias=bias,
            **extra,
        )

    # ---------------------------------------------------------------- helpers
    def rope_params(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def sparse_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.sparse_layers) if s)

    @property
    def router_spec(self) -> RouterSpec:
        """The routing rule (services/core/routing.py); Mixtral/Qwen3 derive theirs."""
        if self.routing is not None:
            return self.routing
        return RouterSpec(num_experts=self.num_experts, top_k=self.top_k,
                          norm_topk_prob=self.norm_topk_prob,
                          weights_float32=self.router_weights_float32)

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """RoPE inverse frequencies ``[rotary_dim // 2]`` (float32) and the cos/sin scale
        factor."""
        return rope_inv_freq(self.rotary_dim or self.head_dim, self.rope_theta,
                             self.rope_params(), self.max_position_embeddings)


def rope_inv_freq(dim: int, base: float, params: dict[str, Any] | None,
                  max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the RoPE variants of Llama-style configs.

    ``dynamic`` (NTK) only changes frequencies past ``max_position_embeddings``, which the
    engine never serves (prompts + generation are bounded by it), so in range it is ``default``.
    """
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pos_freqs = base ** exps
    inv_freq = 1.0 / pos_freqs
    kind = "default" if params is None else params.get("rope_type", "default")
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    factor = float(params["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: blend interpolated and extrapolated frequencies over a linear ramp (YaRN paper §3)
    orig = float(params.get("original_max_position_embeddings") or max_positions)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = params.get("attention_factor")
    if attn is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrap = 1 - ramp
    # 1 / (factor * base^x), not inv_freq / factor: the rounding transformers does
    return (1.0 / (factor * pos_freqs)) * (1 - extrap) + inv_freq * extrap, float(attn)


def _deepseek_fields(d: dict[str, Any], family: str, num_layers: int, num_experts: int
                     ) -> tuple[tuple[bool, ...], int, int, dict[str, Any]]:
    """(sparse layers, expert width, dense width, extra ModelConfig fields) of a DeepSeek-V2/V3
    config; every variant we do not implement is a one-line error naming its key."""
    def req(name: str) -> Any:
        if d.get(name) is None:
            raise ConfigError(f"config field {name!r} is missing")
        return d[name]

    v3 = family == "deepseek_v3"
    first_dense = d.get("first_k_dense_replace") or 0
    if not isinstance(first_dense, int) or not 0 <= first_dense <= num_layers:
        raise ConfigError(f"first_k_dense_replace must be in [0, {num_layers}], got "
                          f"{first_dense!r}")
    if (d.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(f"moe_layer_freq: {d['moe_layer_freq']} is not supported (only 1: "
                          "every layer after first_k_dense_replace is MoE)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        key = "attention_bias" if d.get("attention_bias") else "mlp_bias"
        raise ConfigError(f"{key}: biases are not supported for {family}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act: {act!r} is not supported (silu)")
    sparse = tuple(i >= first_dense for i in range(num_layers))
    expert_inter = req("moe_intermediate_size")
    dense_inter = req("intermediate_size") if first_dense else (d.get("intermediate_size") or 0)
    shared = expert_inter * (d.get("n_shared_experts") or 0)

    scoring = d.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    if scoring != ("sigmoid" if v3 else "softmax"):
        raise ConfigError(f"scoring_func: {scoring!r} is not supported for {family}")
    method = d.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    if v3 and method != "noaux_tc":
        raise ConfigError(f"topk_method: {method!r} is not supported for {family} (noaux_tc)")
    if not v3 and method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"topk_method: {method!r} is not supported for {family} "
                          "(greedy, group_limited_greedy)")
    norm = bool(d.get("norm_topk_prob", v3))
    if norm and not v3:
        # transformers' V2 ignores it while DeepSeek's own code renormalises: no referee
        raise ConfigError("norm_topk_prob: true is not supported for deepseek_v2")
    routing = RouterSpec(
        num_experts=num_experts, top_k=req("num_experts_per_tok"), scoring=scoring,
        method=method, n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
        norm_topk_prob=norm, routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        score_bias=v3, logits_float32=True, weights_float32=True)

    rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    nope, rope_dim = req("qk_nope_head_dim"), req("qk_rope_head_dim")
    scale = float((nope + rope_dim) ** -0.5) if isinstance(nope, int) and isinstance(
        rope_dim, int) else 1.0
    if kind != "default" and rope.get("mscale_all_dim"):
        m = _yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"]))
        scale = scale * m * m
    mla = MLASpec(q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=req("kv_lora_rank"),
                  qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=req("v_head_dim"),
                  rope_interleave=bool(d.get("rope_interleave", True)) if v3 else True,
                  softmax_scale=scale)
    mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers")) or 0
    return sparse, expert_inter, dense_inter, dict(
        mla=mla, routing=routing, shared_expert_intermediate_size=shared, mtp_layers=int(mtp))
