"""``megascale demo-model``: write a small random MoE checkpoint in Hugging Face layout.

Output: config.json (loadable by transformers' AutoModelForCausalLM), model.safetensors (or
shards + model.safetensors.index.json), generation_config.json, and — when the demo tokenizer
builder is available — tokenizer.json / tokenizer_config.json.

Initialisation is chosen so greedy decoding is numerically robust: large-ish logit and router
scales give clear margins between the top candidates, so float32 summation-order differences
between implementations do not flip an argmax or a routing decision.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.core.demo_deepseek import DEEPSEEK_FAMILIES, write_deepseek_checkpoint
from services.core.demo_families import write_family_checkpoint
from services.core.families import GQA_FAMILIES
from services.errors import UserError

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3") + GQA_FAMILIES


def _hf_config(family: str, *, layers: int, hidden: int, intermediate: int, experts: int,
               top_k: int, heads: int, kv_heads: int, vocab: int, head_dim: int | None,
               max_position: int, dense_layers: Sequence[int], dense_intermediate: int,
               norm_topk_prob: bool, tie_word_embeddings: bool, rope_theta: float,
               rope_scaling: dict | None, special: dict[str, int]) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
    common: dict[str, Any] = {
        "attention_dropout": 0.0, "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "max_position_embeddings": max_position, "num_attention_heads": heads,
        "num_experts_per_tok": top_k, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "rope_parameters": rope,
        "router_aux_loss_coef": 0.001, "output_router_logits": False,
        "sliding_window": None, "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True, "vocab_size": vocab, "dtype": "float32",
        # Qwen3 reads head_dim with getattr(..., default), so a null would break it: always set.
        "head_dim": head_dim,
    }
    if family == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "intermediate_size": intermediate, "num_local_experts": experts,
                "router_jitter_noise": 0.0, **common}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "moe_intermediate_size": intermediate, "intermediate_size": dense_intermediate,
            "num_experts": experts, "decoder_sparse_step": 1, "mlp_only_layers": list(dense_layers),
            "norm_topk_prob": norm_topk_prob, "attention_bias": False,
            "use_sliding_window": False, **common}


def _build_tokenizer(out: Path, family: str, vocab: int) -> dict[str, int] | None:
    """Call the demo tokenizer builder when it is installed; None means "no tokenizer"."""
    try:
        from services.core.tokenizer_build import build_demo_tokenizer
    except ImportError:
        return None
    return build_demo_tokenizer(out, family, vocab)


def write_random_checkpoint(out_dir: str | Path, family: str = "mixtral", *, layers: int = 4,
                            hidden: int = 128, intermediate: int = 256, experts: int = 8,
                            top_k: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 1024,
                            head_dim: int | None = None, max_position: int = 4096,
                            dense_layers: Sequence[int] = (), dense_intermediate: int | None = None,
                            norm_topk_prob: bool = True, tie_word_embeddings: bool = False,
                            rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                            seed: int = 0, shards: int = 1, tokenizer: bool = True,
                            mxfp4: bool = False) -> Path:
    """Write a random checkpoint to ``out_dir`` and return it. Deterministic for a given seed.

    DeepSeek families go to :func:`demo_deepseek.write_deepseek_checkpoint` (transformers
    writes them); ``dense_layers`` must then be ``range(k)`` (first_k_dense_replace = k)."""
    if family in DEEPSEEK_FAMILIES:
        k = len(dense_layers)
        if list(dense_layers) != list(range(k)):
            raise UserError(f"--dense-layers for {family} must be the first layers 0..k-1 "
                            "(first_k_dense_replace)")
        if heads != kv_heads or head_dim is not None or tie_word_embeddings:
            raise UserError(f"{family} has MLA attention: --kv-heads, --head-dim and "
                            "--tie-embeddings do not apply")
        return write_deepseek_checkpoint(
            out_dir, family, layers=layers, hidden=hidden, intermediate=intermediate,
            experts=experts, top_k=top_k, heads=heads, vocab=vocab, dense_layers=k,
            dense_intermediate=dense_intermediate, max_position=max_position,
            rope_scaling=rope_scaling, seed=seed, shards=shards, tokenizer=tokenizer,
            n_group=_groups(experts), topk_group=max(1, _groups(experts) // 2),
            topk_method="group_limited_greedy" if family == "deepseek_v2" else None)
    if family in GQA_FAMILIES:  # Qwen2-MoE / OLMoE / GLM-4.5: transformers writes them
        if tie_word_embeddings or rope_scaling is not None:
            raise UserError(f"--tie-embeddings and RoPE scaling are not offered for {family}")
        return write_family_checkpoint(
            out_dir, family, layers=layers, hidden=hidden, intermediate=intermediate,
            experts=experts, top_k=top_k, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            vocab=vocab, dense_layers=dense_layers, dense_intermediate=dense_intermediate,
            max_position=max_position, seed=seed, shards=shards, tokenizer=tokenizer,
            clip_qkv=8.0 if family == "olmoe" else None, mxfp4=mxfp4)
    if mxfp4:
        raise UserError("--mxfp4 applies to the gpt_oss family only")
    if family not in FAMILIES:
        raise UserError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "mixtral" and dense_layers:
        raise UserError("dense layers (mlp_only_layers) exist only in the qwen3_moe family")
    for name, v in (("layers", layers), ("hidden", hidden), ("intermediate", intermediate),
                    ("experts", experts), ("top_k", top_k), ("heads", heads),
                    ("kv_heads", kv_heads), ("vocab", vocab), ("shards", shards)):
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if top_k > experts:
        raise UserError(f"--top-k ({top_k}) must be <= --experts ({experts})")
    if heads % kv_heads:
        raise UserError(f"--heads ({heads}) must be divisible by --kv-heads ({kv_heads})")
    hd = head_dim or hidden // heads
    if head_dim is None and hidden % heads:
        raise UserError(f"--hidden ({hidden}) must be divisible by --heads ({heads})")
    if any(not 0 <= i < layers for i in dense_layers):
        raise UserError(f"--dense-layers must be layer indices in [0, {layers})")
    dense_inter = dense_intermediate or 2 * intermediate
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = _build_tokenizer(out, family, vocab) if tokenizer else None
    special = special or {"bos": 1, "eos": 2, "pad": 0}

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_w(n: int) -> torch.Tensor:
        return 1.0 + rnd(n, std=0.1)

    H, FF, DI = hidden, intermediate, dense_inter
    # Tied: a small embedding keeps a token's own embedding from dominating its logits (which
    # would make the model repeat its input token forever).
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight":
                                  rnd(vocab, H, std=0.1 if tie_word_embeddings else 1.0),
                                  "model.norm.weight": norm_w(H)}
    if not tie_word_embeddings:
        # logits std ~ 4: a clear gap between the top-2 candidates at every step
        t["lm_head.weight"] = rnd(vocab, H, std=4.0 / math.sqrt(H))
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm_w(H)
        t[f"{p}.post_attention_layernorm.weight"] = norm_w(H)
        t[f"{p}.self_attn.q_proj.weight"] = rnd(heads * hd, H, std=1.0 / math.sqrt(H))
        t[f"{p}.self_attn.k_proj.weight"] = rnd(kv_heads * hd, H, std=1.0 / math.sqrt(H))
        t[f"{p}.self_attn.v_proj.weight"] = rnd(kv_heads * hd, H, std=1.0 / math.sqrt(H))
        t[f"{p}.self_attn.o_proj.weight"] = rnd(H, heads * hd, std=0.5 / math.sqrt(heads * hd))
        if family == "qwen3_moe":
            t[f"{p}.self_attn.q_norm.weight"] = norm_w(hd)
            t[f"{p}.self_attn.k_norm.weight"] = norm_w(hd)
        if i in dense_layers:
            t[f"{p}.mlp.gate_proj.weight"] = rnd(DI, H, std=1.0 / math.sqrt(H))
            t[f"{p}.mlp.up_proj.weight"] = rnd(DI, H, std=1.0 / math.sqrt(H))
            t[f"{p}.mlp.down_proj.weight"] = rnd(H, DI, std=0.5 / math.sqrt(DI))
            continue
        # router logits std ~ 3: well-separated expert choices
        t[f"{p}.{moe}.gate.weight"] = rnd(experts, H, std=3.0 / math.sqrt(H))
        for e in range(experts):
            q = f"{p}.{moe}.experts.{e}"
            t[f"{q}.{names[0]}.weight"] = rnd(FF, H, std=1.0 / math.sqrt(H))
            t[f"{q}.{names[1]}.weight"] = rnd(FF, H, std=1.0 / math.sqrt(H))
            t[f"{q}.{names[2]}.weight"] = rnd(H, FF, std=0.5 / math.sqrt(FF))
    t = {k: v.contiguous() for k, v in t.items()}
    _save(out, t, shards)

    cfg = _hf_config(family, layers=layers, hidden=H, intermediate=FF, experts=experts,
                     top_k=top_k, heads=heads, kv_heads=kv_heads, vocab=vocab, head_dim=hd,
                     max_position=max_position, dense_layers=dense_layers,
                     dense_intermediate=DI, norm_topk_prob=norm_topk_prob,
                     tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta,
                     rope_scaling=rope_scaling, special=special)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
           "pad_token_id": special.get("pad"), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _groups(experts: int) -> int:
    """Expert groups for a DeepSeek demo: 4 when they divide into groups of 2 or more."""
    return 4 if experts % 4 == 0 and experts >= 8 else 1


def _save(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo-model", help="write a small random MoE checkpoint",
                              description="Write a small random MoE checkpoint in HF layout.")
    p.add_argument("--family", choices=FAMILIES, default="mixtral")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256, help="expert FFN width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--max-position", type=int, default=4096)
    p.add_argument("--dense-layers", type=_int_list, default=[],
                   help="qwen3_moe, qwen2_moe: comma-separated dense (mlp_only) layer "
                        "indices; deepseek, glm4_moe: the first k layers 0,..,k-1")
    p.add_argument("--dense-intermediate", type=int, default=None)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mxfp4", action="store_true",
                   help="gpt_oss: store the expert weights as MXFP4 blocks/scales")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    heads = args.heads
    kv_heads = heads if args.family in DEEPSEEK_FAMILIES else args.kv_heads
    out = write_random_checkpoint(
        args.out, args.family, layers=args.layers, hidden=args.hidden,
        intermediate=args.intermediate, experts=args.experts, top_k=args.top_k, heads=heads,
        kv_heads=kv_heads, head_dim=args.head_dim, vocab=args.vocab,
        max_position=args.max_position, dense_layers=args.dense_layers,
        dense_intermediate=args.dense_intermediate, tie_word_embeddings=args.tie_embeddings,
        shards=args.shards, seed=args.seed, mxfp4=args.mxfp4)
    print(out)
    return 0
