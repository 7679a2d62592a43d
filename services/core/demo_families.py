"""Small random Qwen2-MoE / OLMoE / GLM-4.5 / DBRX / MiniMax-M2 / gpt-oss checkpoints, written
by ``transformers`` itself.

As :mod:`services.core.demo_deepseek`: the model is built by transformers from its own config
class, its parameters are re-drawn with margin-friendly scales (``demo_deepseek._draw``: clear
gaps between top logits and between routed experts, so float32 summation order never flips a
greedy choice) and ``save_pretrained`` writes config.json and the safetensors in hub layout.
``megascale demo-model --family qwen2_moe|olmoe|glm4_moe|dbrx|minimax_m2|gpt_oss`` calls this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.core.demo_deepseek import _draw
from services.core.families import GQA_FAMILIES
from services.errors import UserError


def family_hf_config(family: str, *, layers: int, hidden: int, intermediate: int,
                     experts: int, top_k: int, heads: int, kv_heads: int, head_dim: int | None,
                     vocab: int, dense_layers: Sequence[int], dense_intermediate: int,
                     shared_intermediate: int, max_position: int, clip_qkv: float | None,
                     norm_topk_prob: bool | None, attention_bias: bool, qk_norm: bool,
                     n_group: int, topk_group: int, routed_scaling_factor: float,
                     partial_rotary_factor: float, special: dict[str, int],
                     sliding_window: int = 8, swiglu_limit: float = 7.0,
                     use_sliding_window: bool = False) -> dict[str, Any]:
    """The config.json fields (transformers spelling) of a ``family`` checkpoint."""
    d: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts_per_tok=top_k,
        max_position_embeddings=max_position, bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"), pad_token_id=special.get("pad"),
        tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen2_moe":
        return d | dict(
            intermediate_size=dense_intermediate, moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=shared_intermediate, num_experts=experts,
            decoder_sparse_step=1, mlp_only_layers=list(dense_layers), qkv_bias=True,
            norm_topk_prob=bool(norm_topk_prob), use_sliding_window=use_sliding_window,
            sliding_window=sliding_window, max_window_layers=layers)
    if family == "dbrx":
        return dict(
            d_model=hidden, n_heads=heads, n_layers=layers, max_seq_len=max_position,
            vocab_size=vocab, bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
            pad_token_id=special.get("pad"), tie_word_embeddings=False,
            attn_config=dict(kv_n_heads=kv_heads, clip_qkv=clip_qkv, rope_theta=10000.0),
            ffn_config=dict(ffn_hidden_size=intermediate, moe_num_experts=experts,
                            moe_top_k=top_k, moe_normalize_expert_weights=1.0))
    if family == "gpt_oss":  # YaRN as released (factor 32 over 4096), scaled to the demo
        d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                "original_max_position_embeddings": max(16, max_position // 4)}
        return d | dict(
            head_dim=head_dim or hidden // heads, intermediate_size=intermediate,
            num_local_experts=experts, sliding_window=sliding_window,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                         for i in range(layers)],
            attention_bias=True, swiglu_limit=swiglu_limit, swiglu_alpha=1.702)
    if family == "minimax_m2":
        d["rope_parameters"]["partial_rotary_factor"] = partial_rotary_factor
        return d | dict(head_dim=head_dim or hidden // heads, intermediate_size=intermediate,
                        num_local_experts=experts)
    if family == "olmoe":
        return d | dict(intermediate_size=intermediate, num_experts=experts, clip_qkv=clip_qkv,
                        norm_topk_prob=bool(norm_topk_prob), attention_bias=attention_bias)
    d["rope_parameters"]["partial_rotary_factor"] = partial_rotary_factor
    return d | dict(
        head_dim=head_dim or hidden // heads, intermediate_size=dense_intermediate,
        moe_intermediate_size=intermediate, n_routed_experts=experts,
        n_shared_experts=shared_intermediate // intermediate,
        first_k_dense_replace=len(dense_layers), n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=True if norm_topk_prob is None else norm_topk_prob,
        use_qk_norm=qk_norm, attention_bias=attention_bias)


def write_family_checkpoint(out_dir: str | Path, family: str, *, layers: int = 3,
                            hidden: int = 64, intermediate: int = 32, experts: int = 8,
                            top_k: int = 2, heads: int = 4, kv_heads: int = 2,
                            head_dim: int | None = None, vocab: int = 512,
                            dense_layers: Sequence[int] = (), dense_intermediate: int | None = None,
                            shared_intermediate: int | None = None, max_position: int = 4096,
                            clip_qkv: float | None = None, norm_topk_prob: bool | None = None,
                            attention_bias: bool = True, qk_norm: bool = True, n_group: int = 1,
                            topk_group: int = 1, routed_scaling_factor: float = 1.0,
                            partial_rotary_factor: float = 0.5, sliding_window: int = 8,
                            swiglu_limit: float = 7.0, mxfp4: bool = False,
                            use_sliding_window: bool = False, seed: int = 0,
                            shards: int = 1, tokenizer: bool = True) -> Path:
    """Write a random ``family`` checkpoint with transformers and return its directory.

    ``dense_layers``: Qwen2-MoE's ``mlp_only_layers``; GLM's must be ``0..k-1``
    (``first_k_dense_replace = k``); OLMoE has none. ``shared_intermediate`` is the shared
    expert width (Qwen2-MoE; GLM: a multiple of ``intermediate``, ``n_shared_experts``).
    ``sliding_window``: gpt-oss's sliding layers, and Qwen2-MoE's with ``use_sliding_window``.
    ``mxfp4`` (gpt-oss): the expert weights are then stored as MXFP4 blocks/scales, as the
    released checkpoints are (transformers writes the model, :func:`mxfp4.quantize` the
    expert tensors; transformers has no CPU MXFP4 writer)."""
    import transformers

    if family not in GQA_FAMILIES:
        raise UserError(f"family must be one of {', '.join(GQA_FAMILIES)}, got {family!r}")
    if any(not 0 <= i < layers for i in dense_layers):
        raise UserError(f"--dense-layers must be layer indices in [0, {layers})")
    if family in ("olmoe", "dbrx", "minimax_m2", "gpt_oss") and dense_layers:
        raise UserError(f"{family} has no dense layers (--dense-layers)")
    if family == "glm4_moe" and list(dense_layers) != list(range(len(dense_layers))):
        raise UserError("--dense-layers for glm4_moe must be the first layers 0..k-1 "
                        "(first_k_dense_replace)")
    if mxfp4 and family != "gpt_oss":
        raise UserError("--mxfp4: MXFP4 checkpoints exist for gpt_oss only")
    if family in ("olmoe", "dbrx") and head_dim not in (None, hidden // heads):
        raise UserError(f"{family}: --head-dim must be hidden / heads")
    shared = intermediate if shared_intermediate is None else shared_intermediate
    if family == "glm4_moe" and shared % intermediate:
        raise UserError("glm4_moe: the shared width must be a multiple of --intermediate "
                        "(n_shared_experts)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = None
    if tokenizer:
        try:  # gpt-oss: the harmony format; the Qwen-style one (ChatML) serves the others
            from services.core.tokenizer_build import build_demo_tokenizer
            special = build_demo_tokenizer(out, "gpt_oss" if family == "gpt_oss" else
                                           "qwen3_moe", vocab)
        except ImportError:
            special = None
    special = special or {"bos": 1, "eos": 2, "pad": 0}
    d = family_hf_config(
        family, layers=layers, hidden=hidden, intermediate=intermediate, experts=experts,
        top_k=top_k, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
        dense_layers=dense_layers, dense_intermediate=dense_intermediate or 2 * intermediate,
        shared_intermediate=shared, max_position=max_position, clip_qkv=clip_qkv,
        norm_topk_prob=norm_topk_prob, attention_bias=attention_bias, qk_norm=qk_norm,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
        partial_rotary_factor=partial_rotary_factor, special=special,
        sliding_window=sliding_window, swiglu_limit=swiglu_limit,
        use_sliding_window=use_sliding_window)
    prefix = {"qwen2_moe": "Qwen2Moe", "olmoe": "Olmoe", "glm4_moe": "Glm4Moe",
              "dbrx": "Dbrx", "minimax_m2": "MiniMaxM2", "gpt_oss": "GptOss"}[family]
    config = getattr(transformers, f"{prefix}Config")(**d)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("inv_freq"):
                continue
            if family == "dbrx":
                p.copy_(_draw_dbrx(name, tuple(p.shape), g, intermediate))
            elif family == "gpt_oss":
                p.copy_(_draw_gpt_oss(name, tuple(p.shape), g, hidden, intermediate))
            else:  # MiniMax-M2's MoE block has Mixtral's name
                p.copy_(_draw(name.replace("block_sparse_moe.", "mlp."), tuple(p.shape), g,
                              sigmoid=family in ("glm4_moe", "minimax_m2")))
    if shards > 1:  # about `shards` files of roughly equal size
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(out, max_shard_size=f"{max(1, total // shards // 1000 + 1)}KB")
    else:
        model.save_pretrained(out)
    if mxfp4:
        _to_mxfp4(out)
    gen = {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
           "pad_token_id": special.get("pad"), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


# DBRX module names -> the role names demo_deepseek._draw knows
_DBRX_ROLES = (("transformer.wte.weight", "model.embed_tokens.weight"),
               ("norm_1.weight", "norm.weight"), ("norm_2.weight", "norm.weight"),
               ("norm_f.weight", "norm.weight"), ("router.layer.weight", "mlp.gate.weight"),
               ("out_proj.weight", "o_proj.weight"))


def _draw_dbrx(name: str, shape: tuple[int, ...], g: torch.Generator, inter: int
               ) -> torch.Tensor:
    if name.endswith("mlp.w2"):  # [E * I, H], the transposed down projection: fan-in I
        return torch.randn(*shape, generator=g) * (0.5 / inter ** 0.5)
    role = next((r for suffix, r in _DBRX_ROLES if name.endswith(suffix)), name)
    return _draw(role, shape, g, sigmoid=False)


def _draw_gpt_oss(name: str, shape: tuple[int, ...], g: torch.Generator, hidden: int,
                  inter: int) -> torch.Tensor:
    def rnd(std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    if name.endswith("experts.gate_up_proj"):  # [E, H, 2I], input-major
        return rnd(hidden ** -0.5)
    if name.endswith("experts.down_proj"):  # [E, I, H]
        return rnd(0.5 * inter ** -0.5)
    if name.endswith(("_bias", ".bias")):
        return rnd(0.1)
    if name.endswith("self_attn.sinks"):
        return rnd(1.0)  # sinks that take a real share of some heads' attention
    return _draw(name.replace("mlp.router.", "mlp.gate."), shape, g, sigmoid=False)


def _to_mxfp4(out: Path) -> None:
    """Rewrite a gpt-oss checkpoint's expert weights as MXFP4 (single-file checkpoints)."""
    from safetensors.torch import load_file, save_file

    from services.core import mxfp4

    path = out / "model.safetensors"
    if not path.is_file():
        raise UserError("MXFP4 demo checkpoints are written unsharded (--shards 1)")
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        # [E, in, out] input-major -> out-major [E, out, in] in 32-value blocks
        blocks, scales = mxfp4.quantize(tensors.pop(key).transpose(1, 2))
        tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
