"""MoE model shapes as the planner sees them: sizes, not weights.

The planner needs only a handful of numbers per model (layers, hidden size, heads, experts, top-k,
expert intermediate size, vocabulary) to derive parameter bytes, KV-cache bytes and FLOPs per
token. They come from a named preset (the paper's models plus newer ones) or from a Hugging
Face ``config.json`` read here directly, so that ``megascale plan`` never imports the core (or
torch).

All byte counts assume bf16 (2 bytes per element), as the paper does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from services.errors import ConfigError, UserError

BYTES = 2  # bf16


@dataclass(frozen=True)
class MoEShape:
    """The shape of a decoder-only MoE model (every layer assumed to be an MoE layer).

    ``attention`` is ``"gqa"`` (multi-head/grouped-query attention) or ``"mla"`` (DeepSeek's
    multi-head latent attention, modelled approximately: compressed KV of ``kv_lora_rank +
    rope_dim`` per token per layer, projections counted from their matrix sizes).
    ``shared_intermediate`` is the size of an always-on shared expert (0 if none); the planner
    runs it on the attention side, next to the router.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_intermediate: int
    vocab: int = 32000
    shared_intermediate: int = 0
    attention: str = "gqa"
    # MLA only (DeepSeek-V3 values by default); q_lora_rank 0 = a plain q_proj (V2-Lite)
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    rope_dim: int = 64
    nope_dim: int = 128
    v_head_dim: int = 128

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "kv_heads", "head_dim", "experts", "top_k",
                      "expert_intermediate", "vocab"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model {self.name!r}: {field} must be a positive integer, "
                                  f"got {value!r}")
        if self.top_k > self.experts:
            raise ConfigError(f"model {self.name!r}: top_k ({self.top_k}) exceeds experts "
                              f"({self.experts})")
        if self.heads % self.kv_heads:
            raise ConfigError(f"model {self.name!r}: heads ({self.heads}) is not a multiple of "
                              f"kv_heads ({self.kv_heads})")
        if self.attention not in ("gqa", "mla"):
            raise ConfigError(f"model {self.name!r}: attention must be 'gqa' or 'mla', "
                              f"got {self.attention!r}")
        if self.shared_intermediate < 0:
            raise ConfigError(f"model {self.name!r}: shared_intermediate must be >= 0")

    # ---- attention side, per layer -------------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        """Attention projections + router gate + shared expert, one layer (elements)."""
        h = self.hidden
        if self.attention == "gqa":
            q = h * self.heads * self.head_dim
            kv = 2 * h * self.kv_heads * self.head_dim
            o = self.heads * self.head_dim * h
            proj = q + kv + o
        else:  # MLA: q down/up, kv down (+rope key), kv up (k_nope and v), output
            qk_dim = self.nope_dim + self.rope_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.heads * qk_dim
                 if self.q_lora_rank else h * self.heads * qk_dim)
            proj = (q + h * (self.kv_lora_rank + self.rope_dim)
                    + self.kv_lora_rank * self.heads * (self.nope_dim + self.v_head_dim)
                    + self.heads * self.v_head_dim * h)
        router = h * self.experts
        shared = 3 * h * self.shared_intermediate
        return proj + router + shared

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV-cache bytes one token occupies in one layer (the paper's ``4·h/g`` for GQA)."""
        if self.attention == "gqa":
            return 2 * BYTES * self.kv_heads * self.head_dim
        return BYTES * (self.kv_lora_rank + self.rope_dim)

    @property
    def attn_ctx_flops_per_token(self) -> int:
        """FLOPs of QK^T and PV for one new token against one cached token, one layer."""
        if self.attention == "gqa":
            return 4 * self.heads * self.head_dim
        # absorbed MLA: scores and values both run in the latent space
        return 2 * self.heads * (2 * self.kv_lora_rank + self.rope_dim)

    # ---- expert side, per layer ----------------------------------------------------------
    @property
    def expert_params_per_layer(self) -> int:
        """One routed expert's SwiGLU FFN (gate, up, down), one layer (elements)."""
        return 3 * self.hidden * self.expert_intermediate

    # ---- whole model ---------------------------------------------------------------------
    @property
    def embed_params(self) -> int:
        """Token embedding + LM head (untied), held by every attention replica."""
        return 2 * self.vocab * self.hidden

    @property
    def attn_params(self) -> int:
        """``P_a``: every parameter an attention replica holds (elements)."""
        return self.layers * self.attn_params_per_layer + self.embed_params

    @property
    def expert_params(self) -> int:
        """``P_e``: one expert of every layer (elements), what one expert node holds per expert."""
        return self.layers * self.expert_params_per_layer

    @property
    def total_params(self) -> int:
        return self.attn_params + self.experts * self.expert_params

    @property
    def active_params(self) -> int:
        return self.attn_params + self.top_k * self.expert_params

    def describe(self) -> str:
        return (f"{self.name}: {self.layers} layers, hidden {self.hidden}, {self.experts} experts "
                f"top-{self.top_k}, {self.total_params / 1e9:.0f}B params "
                f"({self.active_params / 1e9:.0f}B active)")


PRESETS: dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape("Mixtral-8x22B", layers=56, hidden=6144, heads=48, kv_heads=8, head_dim=128,
                 experts=8, top_k=2, expert_intermediate=16384, vocab=32768),
        MoEShape("DBRX", layers=40, hidden=6144, heads=48, kv_heads=8, head_dim=128,
                 experts=16, top_k=4, expert_intermediate=10752, vocab=100352),
        MoEShape("Qwen3-235B-A22B", layers=94, hidden=4096, heads=64, kv_heads=4, head_dim=128,
                 experts=128, top_k=8, expert_intermediate=1536, vocab=151936),
        # A small Mixtral-like shape a CPU profiles in seconds (`plan --profile` default).
        MoEShape("local-tiny-moe", layers=4, hidden=256, heads=8, kv_heads=4, head_dim=32,
                 experts=8, top_k=2, expert_intermediate=512, vocab=1024),
        # DeepSeek-V3 (also Kimi-K2's shape class): MLA, one shared expert on the attention
        # side; the first 3 dense layers are treated as MoE layers (approximation, 3 of 61).
        MoEShape("DeepSeek-V3", layers=61, hidden=7168, heads=128, kv_heads=128, head_dim=128,
                 experts=256, top_k=8, expert_intermediate=2048, vocab=129280,
                 shared_intermediate=2048, attention="mla"),
        # gpt-oss-120b (117B, ~5B active): alternating 128-token sliding-window and full
        # attention layers are all counted as full here, and its MXFP4 experts as bf16.
        MoEShape("gpt-oss-120b", layers=36, hidden=2880, heads=64, kv_heads=8, head_dim=64,
                 experts=128, top_k=4, expert_intermediate=2880, vocab=201088),
        # GLM-4.5 (355B, 32B active): one shared expert on the attention side; its 3 dense
        # first layers are treated as MoE layers (approximation, 3 of 92).
        MoEShape("GLM-4.5", layers=92, hidden=5120, heads=96, kv_heads=8, head_dim=128,
                 experts=160, top_k=8, expert_intermediate=1536, vocab=151552,
                 shared_intermediate=1536),
    )
}


def _int(cfg: dict, *keys: str, default: int | None = None) -> int:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            value = cfg[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"config.json: {key} must be an integer, got {value!r}")
            return value
    if default is None:
        raise ConfigError(f"config.json: missing {' / '.join(keys)}")
    return default


def from_hf_config(cfg: dict, name: str = "model") -> MoEShape:
    """Read the planner's shape from a Hugging Face ``config.json`` dict (Mixtral, Qwen-MoE,
    DeepSeek-V2/V3 and DBRX field names). Raises ConfigError naming the missing field."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json: top level must be a JSON object")
    if "ffn_config" in cfg:  # DBRX nests its MoE fields
        ffn, attn = cfg.get("ffn_config") or {}, cfg.get("attn_config") or {}
        hidden = _int(cfg, "d_model")
        heads = _int(cfg, "n_heads")
        return MoEShape(name, layers=_int(cfg, "n_layers"), hidden=hidden, heads=heads,
                        kv_heads=_int(attn, "kv_n_heads", default=heads),
                        head_dim=hidden // heads, experts=_int(ffn, "moe_num_experts"),
                        top_k=_int(ffn, "moe_top_k"),
                        expert_intermediate=_int(ffn, "ffn_hidden_size"),
                        vocab=_int(cfg, "vocab_size", default=32000))
    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads")
    experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    mla = "kv_lora_rank" in cfg and cfg.get("kv_lora_rank") is not None
    shared = 0
    if cfg.get("n_shared_experts"):
        shared = _int(cfg, "n_shared_experts") * _int(cfg, "moe_intermediate_size")
    elif cfg.get("shared_expert_intermediate_size"):
        shared = _int(cfg, "shared_expert_intermediate_size")
    shape = MoEShape(
        name,
        layers=_int(cfg, "num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=_int(cfg, "num_key_value_heads", default=heads),
        head_dim=_int(cfg, "head_dim", default=hidden // heads),
        experts=experts,
        top_k=_int(cfg, "num_experts_per_tok"),
        expert_intermediate=_int(cfg, "moe_intermediate_size", "intermediate_size"),
        vocab=_int(cfg, "vocab_size", default=32000),
        shared_intermediate=shared,
        attention="mla" if mla else "gqa",
    )
    if mla:
        q_lora = cfg.get("q_lora_rank", 1536)  # null: no q compression (V2-Lite)
        shape = replace(shape, q_lora_rank=0 if q_lora is None else _int(cfg, "q_lora_rank"),
                        kv_lora_rank=_int(cfg, "kv_lora_rank"),
                        rope_dim=_int(cfg, "qk_rope_head_dim", default=64),
                        nope_dim=_int(cfg, "qk_nope_head_dim", default=128),
                        v_head_dim=_int(cfg, "v_head_dim", default=128))
    return shape


def load_model(spec: str) -> MoEShape:
    """A preset name (case-insensitive) or a path to a ``config.json`` (or its directory)."""
    for key, shape in PRESETS.items():
        if spec.lower() == key.lower():
            return shape
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}) "
                        f"and no such config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    return from_hf_config(cfg, name=path.parent.name or path.stem)
