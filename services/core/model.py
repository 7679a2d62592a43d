"""The MoE decoder split at the expert boundary: attention side and expert side.

Contract used by the disaggregated engine (and by :class:`MonolithicModel`, the reference)::

    h = attn.embed(token_ids)                                   # [T, H]
    for layer in range(cfg.num_layers):
        mi = attn.attention_block(layer, h, meta, kv)            # MoEInput
        if mi.routed:
            partial_j = expert_j.forward(layer, mi.normed, mi.topk_ids, mi.topk_weights)
            h = attn.finish_layer(mi, sum_j partial_j)           # any partition of experts
        else:
            h = attn.finish_layer(mi, None)                      # dense layer, done locally
    logits = attn.logits(h, meta.last_index)                    # [B, V]

``ExpertSide.forward`` returns a pre-weighted, pre-summed partial: ids it does not hold (or -1)
contribute zero, so partials over a partition of the experts add up to the full MoE output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.core import cpu_gemm, gpt_oss, mla, routing
from services.core import layers as L
from services.core.batch import BatchMeta, build_batch_meta
from services.core.checkpoint import (
    AttentionLayerWeights,
    AttentionWeights,
    CheckpointIndex,
    ExpertWeights,
    load_attention_weights,
    load_expert_weights,
)
from services.core.config import ModelConfig
from services.core.kv_cache import PagedKVCache

__all__ = ["AttentionSide", "BatchMeta", "ExpertSide", "MoEInput", "MonolithicModel",
           "build_batch_meta"]


@dataclass(frozen=True)
class MoEInput:
    """What leaves the attention side after a layer's attention + router.

    residual [T, H]; normed [T, H] (post-attention RMSNorm, the expert input);
    topk_ids [T, K] int64 and topk_weights [T, K] (routed layers; empty [T, 0] otherwise);
    dense_out [T, H] for a dense layer (already computed here), else None.
    """

    layer: int
    residual: torch.Tensor
    normed: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    routed: bool
    dense_out: torch.Tensor | None = None
    # Shared experts' output [T, H] (DeepSeek), computed on the attention side: by
    # AttentionSide.shared_experts while the routed rows are at the experts, or in finish_layer.
    shared_out: torch.Tensor | None = None


_ROPE_CACHE_ENTRIES = 8  # > the largest micro-batch count (the planner searches m <= 4)


class AttentionSide:
    """Attention-side weights and compute; knows nothing about expert weights."""

    def __init__(self, cfg: ModelConfig, weights: AttentionWeights) -> None:
        self.cfg = cfg
        self.w = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        inv_freq, self.rope_scale = cfg.rope_inv_freq()
        self.inv_freq = inv_freq.to(self.device)
        self.scale = cfg.head_dim ** -0.5
        self.router = cfg.router_spec
        # the decoder's norms (q/k norms are always RMSNorm)
        self._norm = L.layer_norm if cfg.norm_type == "layer" else L.rms_norm
        # MLA decode steps in the weight-absorbed form (services/core/mla.py); False: expanded
        self.mla_absorb = True
        # id(positions) -> (positions, cos, signed sin); see _rope.
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # id(attn_mask) -> (attn_mask, sliding-window mask); see _window_mask (gpt-oss)
        self._window_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Fused QKV projection per layer ([(NH + 2 KVH) * D, H], one GEMM instead of three);
        # the layer's q/k/v become views into it, so the weights are not held twice.
        self._qkv: list[tuple[L.Linear, torch.Tensor | None] | None] = []
        for lw in weights.layers:
            if lw.mla is not None:  # MLA: projections stay separate (services/core/mla.py)
                self._qkv.append(None)
                continue
            w = torch.cat((lw.q, lw.k, lw.v))
            nq, nk = lw.q.shape[0], lw.k.shape[0]
            lw.q, lw.k, lw.v = w[:nq], w[nq:nq + nk], w[nq + nk:]
            b = None
            if lw.q_bias is not None or lw.k_bias is not None or lw.v_bias is not None:
                b = torch.cat([bias if bias is not None else w.new_zeros(n) for bias, n in
                               ((lw.q_bias, nq), (lw.k_bias, nk), (lw.v_bias, nk))])
            self._qkv.append(L.packed_or(w, b))
        # The dense projections of a CPU float32 replica run on the packed kernel
        # (services/core/cpu_gemm.py: linear); the packed copies are what the steps read.
        self._o = [L.packed_or(lw.o, lw.o_bias) for lw in weights.layers]
        self._lm_head = L.packed_or(weights.lm_head)[0]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) ``[T, 1, D]`` for :func:`layers.apply_rope_signed`; MLA models:
        the (cos, sin) of :func:`mla.rope_tables`."""
        # Every layer of a micro-batch uses the same positions tensor: compute the tables once
        # per micro-batch and step. The ping-pong loop interleaves m micro-batches layer by
        # layer, so the cache holds several (a single entry would be recomputed on every
        # call). Holding a reference to the tensor keeps the identity check sound.
        cached = self._rope_cache.get(id(positions))
        if cached is None or cached[0] is not positions or cached[1].dtype != dtype:
            if len(self._rope_cache) >= _ROPE_CACHE_ENTRIES:
                self._rope_cache.clear()  # a new step: the old micro-batches are done
            if self.cfg.mla is not None:
                cos, sin = mla.rope_tables(positions, self.inv_freq, self.rope_scale, dtype,
                                           self.cfg.mla.rope_interleave)
                cached = (positions, cos, sin)
            else:
                cos, sin = L.rope_cos_sin(positions, self.inv_freq, self.rope_scale, dtype)
                cached = (positions, cos, L.signed_sin(sin))
            self._rope_cache[id(positions)] = cached
        return cached[1], cached[2]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", cfg: ModelConfig | None = None,
                        index: CheckpointIndex | None = None) -> AttentionSide:
        cfg = cfg or ModelConfig.from_pretrained(model_dir)
        return cls(cfg, load_attention_weights(model_dir, cfg, dtype, device, index))

    def new_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.cfg, num_blocks, block_size, self.dtype, self.device)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] int64 -> hidden [T, H]."""
        return F.embedding(token_ids, self.w.embed)

    def attention_block(self, layer: int, hidden: torch.Tensor, meta: BatchMeta,
                        kv: PagedKVCache) -> MoEInput:
        """norm -> QKV -> (q/k norm) -> RoPE -> paged attention (writes K/V) -> O -> residual
        -> post-attention norm -> router (sparse layer) or dense MLP (dense layer)."""
        cfg, lw = self.cfg, self.w.layers[layer]
        T = hidden.shape[0]
        NH, KVH = cfg.num_heads, cfg.num_kv_heads
        x = self._norm(hidden, lw.input_norm, cfg.rms_norm_eps)
        if lw.mla is not None:
            attn = mla.mla_attention(x, lw.mla, cfg.mla, NH, cfg.rms_norm_eps,
                                     self._rope(meta.positions, x.dtype), kv.layer(layer)[0],
                                     meta, self.mla_absorb)
            return self._mlp_input(layer, hidden + L.linear(attn, *self._o[layer]))
        qkv = L.linear(x, *self._qkv[layer]).view(T, NH + 2 * KVH, cfg.head_dim)
        q, k, v = qkv[:, :NH], qkv[:, NH:NH + KVH], qkv[:, NH + KVH:]
        cos, sin = self._rope(meta.positions, qkv.dtype)
        if cfg.qk_norm:
            q, k = self._qk_norm(lw, q, k)
            if cfg.clip_qkv is not None:  # OLMoE clamps after the norms
                c = cfg.clip_qkv
                q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        else:  # rotate q and k heads together: one set of elementwise ops
            if cfg.clip_qkv is not None:
                qkv = qkv.clamp(-cfg.clip_qkv, cfg.clip_qkv)
                v = qkv[:, NH + KVH:]
            qk = self._rotate(qkv[:, :NH + KVH], cos, sin)
            q, k = qk[:, :NH], qk[:, NH:]
        k_cache, v_cache = kv.layer(layer)
        if cfg.attention_sinks or cfg.window_layers:  # gpt-oss: eager, with sinks
            mask = meta.attn_mask
            if cfg.window_layers and cfg.window_layers[layer]:
                mask = self._window_mask(mask)
            attn = gpt_oss.sink_attention(q, k, v, k_cache, v_cache, meta, self.scale,
                                          lw.sinks, mask)
        else:
            attn = L.paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self._mlp_input(layer, hidden + L.linear(attn, *self._o[layer]))

    def _window_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The step's mask narrowed to ``cfg.layer_window`` (once per micro-batch and step,
        like the RoPE tables: every sliding layer of a step shares it)."""
        cached = self._window_cache.get(id(mask))
        if cached is None or cached[0] is not mask:
            if len(self._window_cache) >= _ROPE_CACHE_ENTRIES:
                self._window_cache.clear()
            cached = (mask, gpt_oss.window_mask(mask, self.cfg.layer_window))
            self._window_cache[id(mask)] = cached
        return cached[1]

    def _qk_norm(self, lw: AttentionLayerWeights, q: torch.Tensor, k: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of q [T, NH, D] and k [T, KVH, D]: per head (Qwen3, GLM) or over the whole
        projection (OLMoE, MiniMax-M2: weights [NH * D] / [KVH * D])."""
        eps = self.cfg.rms_norm_eps
        if not self.cfg.qk_norm_full_width:
            return L.rms_norm(q, lw.q_norm, eps), L.rms_norm(k, lw.k_norm, eps)
        T = q.shape[0]
        return (L.rms_norm(q.reshape(T, -1), lw.q_norm, eps).view(q.shape),
                L.rms_norm(k.reshape(T, -1), lw.k_norm, eps).view(k.shape))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on x [T, heads, D]: all D dims, or the first ``rotary_dim`` (partial rotary,
        GLM and MiniMax-M2; the rest pass through)."""
        rd = self.cfg.rotary_dim
        if rd is None or rd == x.shape[-1]:
            return L.apply_rope_signed(x, cos, sin)
        return torch.cat((L.apply_rope_signed(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)

    def _mlp_input(self, layer: int, residual: torch.Tensor) -> MoEInput:
        """post-attention norm -> router (sparse layer) or dense MLP (dense layer)."""
        lw = self.w.layers[layer]
        normed = self._norm(residual, lw.post_norm, self.cfg.rms_norm_eps)
        if lw.router is None:
            empty = torch.empty(residual.shape[0], 0, dtype=torch.int64, device=residual.device)
            return MoEInput(layer, residual, normed, empty, empty.to(residual.dtype),
                            routed=False,
                            dense_out=L.swiglu(normed, lw.dense_gate_up, lw.dense_down))
        ids, weights = routing.route(normed, lw.router, self.router, lw.router_bias)
        return MoEInput(layer, residual, normed, ids, weights, routed=True)

    def shared_experts(self, moe_input: MoEInput) -> MoEInput:
        """Run the layer's shared experts (if any) on the routed rows: the engine calls this
        after dispatching them, so it overlaps with the expert nodes' work."""
        lw = self.w.layers[moe_input.layer]
        if lw.shared_gate_up is None or moe_input.shared_out is not None:
            return moe_input
        out = L.swiglu(moe_input.normed, lw.shared_gate_up, lw.shared_down)
        if lw.shared_gate is not None:  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) [T, 1]
            out = torch.sigmoid(F.linear(moe_input.normed, lw.shared_gate)) * out
        return dataclasses.replace(moe_input, shared_out=out)

    def finish_layer(self, moe_input: MoEInput, expert_out: torch.Tensor | None) -> torch.Tensor:
        """residual + (summed expert output [+ shared experts] | dense MLP output) -> next
        layer's hidden [T, H]."""
        if not moe_input.routed:
            return moe_input.residual + moe_input.dense_out
        if expert_out is None:
            raise ValueError(f"layer {moe_input.layer} is routed: expert_out is required")
        if self.w.layers[moe_input.layer].shared_gate_up is not None:
            # (routed + shared) first, then the residual: transformers' order of the sums
            expert_out = expert_out + self.shared_experts(moe_input).shared_out
        return moe_input.residual + expert_out

    def logits(self, hidden: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the rows ``last_index`` [B] -> logits [B, V] (float32)."""
        if last_index.shape[0] != hidden.shape[0]:
            hidden = hidden.index_select(0, last_index)
        # else one token per sequence (decode): last_index is arange(T), nothing to gather
        h = self._norm(hidden, self.w.final_norm, self.cfg.rms_norm_eps)
        return L.linear(h, self._lm_head).float()


class ExpertSide:
    """Holds only the experts it was given (global ids), for every sparse layer."""

    def __init__(self, cfg: ModelConfig, weights: ExpertWeights, pack: bool = True) -> None:
        """``pack=False`` keeps torch's grouped GEMM even where the packed CPU kernel would
        run (the GPU path's numerics on CPU, for A/B checks)."""
        self.cfg = cfg
        self.w = weights
        self.expert_ids = weights.expert_ids
        any_t = next(iter(weights.gate_up.values()), None)
        self.device = any_t.device if any_t is not None else torch.device("cpu")
        self.dtype = any_t.dtype if any_t is not None else torch.float32  # compute dtype
        # global expert id -> index in the stacked weights, -1 if not held; the extra last
        # entry maps the "no expert" id -1 to -1 as well.
        table = torch.full((cfg.num_experts + 1,), -1, dtype=torch.int64)
        for i, e in enumerate(self.expert_ids):
            table[e] = i
        self.local_index = table.to(self.device)
        # gpt-oss's clamped SwiGLU; None: SwiGLU
        self._act = None if cfg.swiglu_limit is None else functools.partial(
            gpt_oss.clamped_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        # Holding every expert in order: global ids are already local ids (-1 stays -1).
        self._identity = list(self.expert_ids) == list(range(cfg.num_experts))
        # Input-major copies for the grouped GEMMs (see layers.grouped_expert_ffn), packed
        # into panels for the CPU kernel where it runs (cpu_gemm.usable); the checkpoint-layout
        # tensors are dropped layer by layer so memory does not double.
        stacks = (weights.gate_up, weights.down)
        self.packed = pack and bool(weights.gate_up) and all(
            cpu_gemm.usable(v.transpose(1, 2)) for d in stacks for v in d.values())
        relayout = cpu_gemm.pack if self.packed else torch.Tensor.contiguous
        self.gate_up_t: dict[int, L.ExpertStack] = {}
        self.down_t: dict[int, L.ExpertStack] = {}
        for src, dst in ((weights.gate_up, self.gate_up_t), (weights.down, self.down_t)):
            for k in list(src):
                dst[k] = relayout(src.pop(k).transpose(1, 2))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, expert_ids: Iterable[int] | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        cfg: ModelConfig | None = None, index: CheckpointIndex | None = None,
                        pack: bool = True) -> ExpertSide:
        """``expert_ids=None`` loads all experts."""
        cfg = cfg or ModelConfig.from_pretrained(model_dir)
        ids = range(cfg.num_experts) if expert_ids is None else expert_ids
        return cls(cfg, load_expert_weights(model_dir, cfg, ids, dtype, device, index), pack)

    def forward(self, layer: int, rows: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """rows [N, H], topk_ids [N, K] (global ids, -1 = none), topk_weights [N, K] -> [N, H]:
        ``sum_k w_k * FFN_{id_k}(row)`` over the ids this side holds (others contribute 0)."""
        if layer not in self.gate_up_t:
            raise ValueError(f"layer {layer} is not a sparse (MoE) layer")
        if self._identity:
            local = topk_ids
        else:
            ids = torch.where(topk_ids < 0, self.cfg.num_experts, topk_ids)
            local = self.local_index[ids]
        return L.grouped_expert_ffn(rows, local, topk_weights, self.gate_up_t[layer],
                                    self.down_t[layer], self._act,
                                    self.w.gate_up_bias.get(layer), self.w.down_bias.get(layer))


class MonolithicModel:
    """Attention side + one expert side holding every expert, in one process (reference path)."""

    def __init__(self, attention: AttentionSide, experts: ExpertSide | list[ExpertSide]) -> None:
        self.attention = attention
        self.experts = experts if isinstance(experts, list) else [experts]
        self.cfg = attention.cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", pack_experts: bool = True
                        ) -> MonolithicModel:
        cfg = ModelConfig.from_pretrained(model_dir)
        index = CheckpointIndex.open(model_dir)
        return cls(AttentionSide.from_pretrained(model_dir, dtype, device, cfg, index),
                   ExpertSide.from_pretrained(model_dir, None, dtype, device, cfg, index,
                                              pack_experts))

    @property
    def device(self) -> torch.device:
        return self.attention.device

    def new_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return self.attention.new_kv_cache(num_blocks, block_size)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, meta: BatchMeta, kv: PagedKVCache) -> torch.Tensor:
        """One step over a flat token list -> logits [B, V] at each sequence's last token."""
        attn = self.attention
        h = attn.embed(token_ids)
        for layer in range(self.cfg.num_layers):
            mi = attn.attention_block(layer, h, meta, kv)
            out = None
            if mi.routed:
                mi = attn.shared_experts(mi)
                for side in self.experts:  # partials over a partition of experts add up
                    part = side.forward(layer, mi.normed, mi.topk_ids, mi.topk_weights)
                    out = part if out is None else out + part
            h = attn.finish_layer(mi, out)
        return attn.logits(h, meta.last_index)
