"""Config fields of the GQA MoE families beyond Mixtral / Qwen3-MoE: Qwen2-MoE, OLMoE, GLM-4.5,
DBRX, MiniMax-M2, gpt-oss.

Each ``*_fields`` function reads one family's Hugging Face ``config.json`` dict (transformers
spelling) and returns the :class:`~services.core.config.ModelConfig` keyword arguments that
differ from the plain Llama-style defaults; ``ModelConfig.from_hf_dict`` adds the common ones
(sizes, RoPE, special tokens). Every variant transformers supports but we do not is a one-line
``ConfigError`` naming its key. How each family differs, in transformers' own terms:

=========  ================================================================================
family     differences
=========  ================================================================================
qwen2_moe  q/k/v biases (``qkv_bias``, o_proj without); a shared expert whose output is
           scaled by ``sigmoid(shared_expert_gate(x))``; ``decoder_sparse_step`` and
           ``mlp_only_layers`` choose the dense layers; softmax routing as Qwen3-MoE;
           ``use_sliding_window``: per-layer windows (``layer_types``, by default the even
           layers below ``max_window_layers``), as gpt-oss's
olmoe      q/k RMSNorm over the *whole* projection (``[NH * D]`` / ``[KVH * D]``, not per
           head), then ``clip_qkv`` clamps q, k and v; ``norm_topk_prob`` false by default;
           ``attention_bias`` on all four projections
glm4_moe   DeepSeek-V3 routing (sigmoid, ``e_score_correction_bias`` for selection,
           ``n_group``/``topk_group``, ``routed_scaling_factor``) and shared experts;
           ``first_k_dense_replace`` dense layers; optional per-head q/k norm
           (``use_qk_norm``); partial rotary (``partial_rotary_factor``, 0.5 by default:
           RoPE on the first half of each head); q/k/v biases (``attention_bias``, o_proj
           without); MTP layers (``num_nextn_predict_layers``) skipped at load
dbrx       nested ``attn_config`` / ``ffn_config`` (:func:`flatten_dbrx`); fused ``Wqkv`` with
           ``clip_qkv``; LayerNorm without bias (eps 1e-5); softmax top-k weights divided by
           their ``moe_normalize_expert_weights``-norm (p = 1 by default), in the compute
           dtype; its own tensor names (services/core/dbrx_weights.py)
minimax_m2 full-width q/k norm (as OLMoE); partial rotary (``rotary_dim``, or
           ``partial_rotary_factor``); sigmoid routing with a selection bias
           (``block_sparse_moe.e_score_correction_bias``), top-k weights renormalised: the
           DeepSeek-V3 rule with one group; Mixtral's tensor names
gpt_oss    ``sliding_attention`` / ``full_attention`` layers (``layer_types``,
           ``sliding_window``) in one model; learned per-head attention sinks; biases on all
           attention projections, the router and the experts; the router's top-k logits
           softmaxed; clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``); YaRN RoPE
           (services/core/gpt_oss.py)
=========  ================================================================================
"""

from __future__ import annotations

from typing import Any

from services.core.routing import RouterSpec
from services.errors import ConfigError

GQA_FAMILIES = ("qwen2_moe", "olmoe", "glm4_moe", "dbrx", "minimax_m2", "gpt_oss")
PARTIAL_ROTARY_FAMILIES = ("glm4_moe", "minimax_m2")


def _req(d: dict[str, Any], name: str) -> Any:
    if d.get(name) is None:
        raise ConfigError(f"config field {name!r} is missing")
    return d[name]


def _silu_only(d: dict[str, Any], family: str) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act: {act!r} is not supported for {family} (silu)")


def _no_sliding(d: dict[str, Any], family: str) -> None:
    # Per-layer windows (layer_types / max_window_layers) are not implemented for these.
    if d.get("use_sliding_window"):
        raise ConfigError(f"use_sliding_window: sliding-window attention is not supported "
                          f"for {family}")
    types = d.get("layer_types") or []
    if any(t != "full_attention" for t in types):
        raise ConfigError(f"layer_types: only full_attention layers are supported for {family}")


def family_fields(family: str, d: dict[str, Any], num_layers: int, num_experts: int
                  ) -> dict[str, Any]:
    """ModelConfig keyword arguments for ``family`` (one of :data:`GQA_FAMILIES`)."""
    _silu_only(d, family)
    if d.get("mlp_bias"):
        raise ConfigError(f"mlp_bias: MLP biases are not supported for {family}")
    if family == "qwen2_moe":
        return _qwen2_moe(d, num_layers, num_experts)
    if family == "olmoe":
        return _olmoe(d, num_layers)
    if family == "dbrx":
        return _dbrx(d, num_layers, num_experts)
    if family == "minimax_m2":
        return _minimax_m2(d, num_layers, num_experts)
    if family == "gpt_oss":
        return _gpt_oss(d, num_layers, num_experts)
    return _glm4_moe(d, num_layers, num_experts)


def flatten_dbrx(d: dict[str, Any]) -> dict[str, Any]:
    """DBRX's nested config in the Llama-style spelling the rest of ModelConfig reads (the
    original ``attn_config`` / ``ffn_config`` stay, for :func:`_dbrx`)."""
    attn, ffn = d.get("attn_config") or {}, d.get("ffn_config") or {}
    if not isinstance(attn, dict) or not isinstance(ffn, dict):
        raise ConfigError("attn_config and ffn_config must be JSON objects")
    act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
    if act != "silu":
        raise ConfigError(f"ffn_config.ffn_act_fn: {act!r} is not supported for dbrx (silu)")
    rope = dict(d.get("rope_parameters") or {})
    rope.setdefault("rope_theta", attn.get("rope_theta", 10000.0))
    return {**d, "hidden_size": d.get("d_model"), "num_attention_heads": d.get("n_heads"),
            "num_hidden_layers": d.get("n_layers"),
            "num_key_value_heads": attn.get("kv_n_heads", d.get("n_heads")),
            "num_local_experts": ffn.get("moe_num_experts"),
            "num_experts_per_tok": ffn.get("moe_top_k"),
            "max_position_embeddings": d.get("max_seq_len"),
            "rope_parameters": rope, "head_dim": None}


def _layer_windows(types: Any, window: Any, num_layers: int) -> dict[str, Any]:
    """``window_layers`` / ``layer_window`` from a ``layer_types`` list (empty when every layer
    is full attention); a bad list or a missing window is a one-line error naming the key."""
    if not isinstance(types, list) or len(types) != num_layers or any(
            t not in ("sliding_attention", "full_attention") for t in types):
        raise ConfigError(f"layer_types must list {num_layers} of sliding_attention / "
                          f"full_attention, got {types!r}")
    windowed = tuple(t == "sliding_attention" for t in types)
    if not any(windowed):
        return {}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"sliding_window must be a positive integer for sliding_attention "
                          f"layers, got {window!r}")
    return dict(window_layers=windowed, layer_window=window)


def _qwen2_moe(d: dict[str, Any], num_layers: int, num_experts: int) -> dict[str, Any]:
    use_window = bool(d.get("use_sliding_window"))
    types = d.get("layer_types")
    if types is None:  # transformers' default
        top = d.get("max_window_layers", 28)
        types = ["sliding_attention" if (i + 1) % 2 and i < top and use_window
                 else "full_attention" for i in range(num_layers)]
    # transformers zeroes the window when use_sliding_window is false
    windows = _layer_windows(types, d.get("sliding_window") if use_window else 0, num_layers)
    step = d.get("decoder_sparse_step", 1) or 1
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"decoder_sparse_step must be a positive integer, got {step!r}")
    mlp_only = set(d.get("mlp_only_layers") or [])
    sparse = tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0
                   for i in range(num_layers))
    return dict(
        sparse_layers=sparse, expert_intermediate_size=_req(d, "moe_intermediate_size"),
        dense_intermediate_size=d.get("intermediate_size") or 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)), qk_norm=False,
        # transformers' default: checkpoints from before the key (Qwen1.5-MoE) have the biases
        attention_bias=bool(d.get("qkv_bias", True)), o_proj_bias=False,
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=True, **windows)


def _olmoe(d: dict[str, Any], num_layers: int) -> dict[str, Any]:
    hidden, heads = d.get("hidden_size"), d.get("num_attention_heads")
    head_dim = d.get("head_dim")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and (
            heads < 1 or head_dim * heads != hidden):
        # transformers sizes the k norm with hidden_size // num_attention_heads
        raise ConfigError(f"head_dim: {head_dim} != hidden_size / num_attention_heads is not "
                          "supported for olmoe")
    if d.get("sliding_window"):
        raise ConfigError("sliding_window: sliding-window attention is not supported for olmoe")
    clip = d.get("clip_qkv")
    if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"clip_qkv must be a positive number or null, got {clip!r}")
    bias = bool(d.get("attention_bias", False))
    return dict(
        sparse_layers=tuple(True for _ in range(num_layers)),
        expert_intermediate_size=_req(d, "intermediate_size"), dense_intermediate_size=0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)), qk_norm=True,
        qk_norm_full_width=True, clip_qkv=None if clip is None else float(clip),
        attention_bias=bias, o_proj_bias=bias)


def _dbrx(d: dict[str, Any], num_layers: int, num_experts: int) -> dict[str, Any]:
    attn, ffn = d.get("attn_config") or {}, d.get("ffn_config") or {}
    for key in ("ffn_hidden_size", "moe_num_experts", "moe_top_k"):
        if ffn.get(key) is None:
            raise ConfigError(f"config field 'ffn_config.{key}' is missing")
    if attn.get("attn_type", "multihead_attention") != "multihead_attention":
        raise ConfigError(f"attn_config.attn_type: {attn['attn_type']!r} is not supported")
    if ffn.get("ffn_type", "mptmoe") not in ("mptmoe", "mb_moe"):
        raise ConfigError(f"ffn_config.ffn_type: {ffn['ffn_type']!r} is not supported")
    clip = attn.get("clip_qkv")
    if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"attn_config.clip_qkv must be a positive number or null, got {clip!r}")
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p is not None and (not isinstance(p, (int, float)) or p <= 0):
        raise ConfigError(f"ffn_config.moe_normalize_expert_weights must be > 0 or null, "
                          f"got {p!r}")
    routing = RouterSpec(num_experts=num_experts, top_k=ffn["moe_top_k"],
                         topk_norm_p=None if p is None else float(p),
                         scores_in_compute_dtype=True)
    return dict(
        sparse_layers=tuple(True for _ in range(num_layers)),
        expert_intermediate_size=ffn["ffn_hidden_size"], dense_intermediate_size=0,
        norm_topk_prob=False, qk_norm=False, attention_bias=False, o_proj_bias=False,
        clip_qkv=None if clip is None else float(clip), routing=routing, norm_type="layer",
        rms_norm_eps=1e-5)  # nn.LayerNorm's default eps


def _minimax_m2(d: dict[str, Any], num_layers: int, num_experts: int) -> dict[str, Any]:
    # Keys of the released config.json that name variants transformers' class does not have.
    if d.get("use_qk_norm") is False or d.get("qk_norm_type", "per_layer") != "per_layer":
        key = "use_qk_norm" if d.get("use_qk_norm") is False else "qk_norm_type"
        raise ConfigError(f"{key}: only the full-width per-layer q/k norm is supported for "
                          "minimax_m2")
    if any(t != 1 for t in d.get("attn_type_list") or []):
        raise ConfigError("attn_type_list: lightning (linear) attention layers are not "
                          "supported (MiniMax-01); minimax_m2 needs every entry 1")
    if d.get("shared_intermediate_size"):
        raise ConfigError("shared_intermediate_size: shared experts are not supported for "
                          "minimax_m2")
    if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("use_routing_bias") is False:
        key = "use_routing_bias" if d.get("use_routing_bias") is False else "scoring_func"
        raise ConfigError(f"{key}: minimax_m2 routes by sigmoid with a selection bias")
    _no_sliding(d, "minimax_m2")
    routing = RouterSpec(num_experts=num_experts, top_k=_req(d, "num_experts_per_tok"),
                         scoring="sigmoid", method="noaux_tc", norm_topk_prob=True,
                         score_bias=True, weights_float32=True)
    return dict(
        sparse_layers=tuple(True for _ in range(num_layers)),
        expert_intermediate_size=_req(d, "intermediate_size"), dense_intermediate_size=0,
        norm_topk_prob=True, qk_norm=True, qk_norm_full_width=True, attention_bias=False,
        o_proj_bias=False, routing=routing)


def _gpt_oss(d: dict[str, Any], num_layers: int, num_experts: int) -> dict[str, Any]:
    types = d.get("layer_types")
    if types is None:  # transformers' default: sliding layers first, alternating
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                 for i in range(num_layers)]
    windows = _layer_windows(types, d.get("sliding_window"), num_layers)
    limit, alpha = d.get("swiglu_limit", 7.0), d.get("swiglu_alpha", 1.702)
    for key, value in (("swiglu_limit", limit), ("swiglu_alpha", alpha)):
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}")
    bias = bool(d.get("attention_bias", True))
    routing = RouterSpec(num_experts=num_experts, top_k=_req(d, "num_experts_per_tok"),
                         topk_softmax=True, logit_bias=True)
    return dict(
        sparse_layers=tuple(True for _ in range(num_layers)),
        expert_intermediate_size=_req(d, "intermediate_size"), dense_intermediate_size=0,
        norm_topk_prob=False, qk_norm=False, attention_bias=bias, o_proj_bias=bias,
        routing=routing, attention_sinks=True, expert_bias=True, swiglu_limit=float(limit),
        swiglu_alpha=float(alpha), **windows)


def _glm4_moe(d: dict[str, Any], num_layers: int, num_experts: int) -> dict[str, Any]:
    first_dense = d.get("first_k_dense_replace", 1)
    if first_dense is None:
        first_dense = 0
    if not isinstance(first_dense, int) or not 0 <= first_dense <= num_layers:
        raise ConfigError(f"first_k_dense_replace must be in [0, {num_layers}], got "
                          f"{first_dense!r}")
    expert_inter = _req(d, "moe_intermediate_size")
    shared = d.get("n_shared_experts", 1) or 0
    if not isinstance(shared, int) or shared < 0:
        raise ConfigError(f"n_shared_experts must be a non-negative integer, got {shared!r}")
    routing = RouterSpec(
        num_experts=num_experts, top_k=_req(d, "num_experts_per_tok"), scoring="sigmoid",
        method="noaux_tc", n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)), score_bias=True,
        logits_float32=True, weights_float32=True)
    mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers")) or 0
    return dict(
        sparse_layers=tuple(i >= first_dense for i in range(num_layers)),
        expert_intermediate_size=expert_inter,
        dense_intermediate_size=_req(d, "intermediate_size") if first_dense else (
            d.get("intermediate_size") or 0),
        norm_topk_prob=routing.norm_topk_prob, qk_norm=bool(d.get("use_qk_norm", False)),
        attention_bias=bool(d.get("attention_bias", False)), o_proj_bias=False,
        routing=routing, shared_expert_intermediate_size=expert_inter * shared,
        mtp_layers=int(mtp))


def partial_rotary_factor(family: str, d: dict[str, Any], rope: dict[str, Any]) -> float:
    """The fraction of each head that RoPE rotates (GLM: 0.5 unless the config says)."""
    default = 0.5 if family == "glm4_moe" else 1.0
    rotary_dim, head_dim = d.get("rotary_dim"), d.get("head_dim")
    if family == "minimax_m2" and isinstance(rotary_dim, int) and isinstance(head_dim, int):
        default = rotary_dim / head_dim  # the released checkpoints' legacy spelling
    value = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", default))
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {value!r}")
    if value != 1 and family not in PARTIAL_ROTARY_FAMILIES:  # transformers ignores it there
        raise ConfigError(f"partial_rotary_factor: partial rotary is not supported for {family}")
    return float(value)
