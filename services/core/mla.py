"""Multi-head latent attention (DeepSeek-V2/V3) over the paged latent cache.

Per token and layer the cache keeps one ``[C + R]`` entry: the normalised KV latent
(``kv_a_layernorm(kv_a_proj(x))[:C]``, C = kv_lora_rank) and the rotated rope key (R =
qk_rope_head_dim) that every head shares. That is ``C + R`` numbers instead of
``NH * (qk_head_dim + v_head_dim)`` for per-head K/V (576 vs 40960 for DeepSeek-V3).

Steps with prefill expand the gathered context through ``kv_b_proj`` into per-head ``k_nope``
and ``v`` and run SDPA, exactly what transformers computes. Pure decode steps (one query token
per sequence) use the weight-absorbed form instead: ``q_nope`` is folded through ``W_uk``
into latent space, every head attends to the shared ``[C + R]`` entries directly (one KV
"head", the heads folded into SDPA's query dim), and the latent output goes through ``W_uv``
afterwards: no per-step expansion of the whole context (``2 S C NH (nope + v)`` FLOPs per
layer and sequence saved). The two forms are equal up to float rounding; greedy fp32 decoding
still matches transformers token for token (tests/core/test_deepseek_model.py).

RoPE on the ``R`` dims: with ``rope_interleave`` the dims are (even, odd) pairs and the rotated
result is laid out de-interleaved (evens' rotation, then odds'), as transformers' V3 does; V2's
complex-number form gives the same values in interleaved order, and since q and k use one
layout the scores are the same. Without it, the usual rotate-half form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.core import layers as L
from services.core.batch import BatchMeta
from services.core.checkpoint import MLALayerWeights
from services.core.config import MLASpec


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                dtype: torch.dtype, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, 1, R/2]`` (interleaved pairs) or ``[T, 1, R]`` (rotate-half)."""
    if not interleave:
        return L.rope_cos_sin(positions, inv_freq, scale, dtype)
    freqs = positions[:, None].float() * inv_freq[None, :]  # [T, R/2]
    return ((freqs.cos() * scale).to(dtype)[:, None, :],
            (freqs.sin() * scale).to(dtype)[:, None, :])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleave: bool) -> torch.Tensor:
    """Rotate x [T, heads, R] by :func:`rope_tables`."""
    if not interleave:
        return L.apply_rope(x, cos, sin)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def mla_attention(x: torch.Tensor, w: MLALayerWeights, spec: MLASpec, num_heads: int,
                  eps: float, rope: tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor,
                  meta: BatchMeta, absorb: bool = True) -> torch.Tensor:
    """x [T, H] (after input_layernorm) -> attention output [T, NH * v] before ``o_proj``.

    ``cache`` is the layer's latent cache ``[1, num_blocks, block_size, C + R]``; this step's
    entries are written at ``meta.slot_mapping`` before attending. ``absorb=False`` keeps the
    expanded form for decode steps too (the reference the tests compare with).
    """
    T = x.shape[0]
    NH, C, R = num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
    nope, vd = spec.qk_nope_head_dim, spec.v_head_dim
    cos, sin = rope
    if spec.q_lora_rank is None:
        q = F.linear(x, w.q)
    else:
        q = F.linear(L.rms_norm(F.linear(x, w.q_a), w.q_a_norm, eps), w.q_b)
    q = q.view(T, NH, nope + R)
    q_rot = apply_rope(q[..., nope:], cos, sin, spec.rope_interleave)
    q = torch.cat((q[..., :nope], q_rot), dim=-1)  # [T, NH, nope + R]

    kv = F.linear(x, w.kv_a)  # [T, C + R]
    latent = L.rms_norm(kv[:, :C], w.kv_a_norm, eps)
    k_rot = apply_rope(kv[:, None, C:], cos, sin, spec.rope_interleave)[:, 0]
    entry = torch.cat((latent, k_rot), dim=-1)  # [T, C + R]
    cache.view(-1, C + R).index_copy_(0, meta.slot_mapping, entry)

    # Gather each sequence's context through its block table -> [B, S, C + R].
    B, qmax, smax = meta.num_seqs, meta.max_query_len, meta.max_seq_len
    ctx = cache[0].index_select(0, meta.block_tables.view(-1)).view(B, -1, C + R)[:, :smax]
    if qmax == 1 and absorb:
        return _absorbed_decode(q, ctx, w, spec, NH, meta)
    kv_full = F.linear(ctx[..., :C], w.kv_b).view(B, smax, NH, nope + vd).transpose(1, 2)
    k_nope, values = kv_full[..., :nope], kv_full[..., nope:]  # [B, NH, S, nope], [.., vd]
    keys = torch.cat((k_nope, ctx[:, None, :, C:].expand(B, NH, smax, R)), dim=-1)
    qp = q.new_zeros(B * qmax, NH, nope + R).index_copy_(0, meta.q_gather, q)
    qp = qp.view(B, qmax, NH, nope + R).transpose(1, 2)  # [B, NH, qmax, nope + R]
    out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=meta.attn_mask,
                                         scale=spec.softmax_scale)  # [B, NH, qmax, vd]
    return out.transpose(1, 2).reshape(B * qmax, NH * vd).index_select(0, meta.q_gather)


def absorbed_weights(w: MLALayerWeights, spec: MLASpec, num_heads: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj`` split for the absorbed form: W_uk ``[NH, nope, C]`` and W_uv^T
    ``[NH, C, v]``, contiguous (cached on ``w``: computed once per layer)."""
    if w.absorbed is None:
        kv_b = w.kv_b.view(num_heads, spec.qk_nope_head_dim + spec.v_head_dim,
                           spec.kv_lora_rank)
        w.absorbed = (kv_b[:, :spec.qk_nope_head_dim].contiguous(),
                      kv_b[:, spec.qk_nope_head_dim:].transpose(1, 2).contiguous())
    return w.absorbed


def _absorbed_decode(q: torch.Tensor, ctx: torch.Tensor, w: MLALayerWeights, spec: MLASpec,
                     NH: int, meta: BatchMeta) -> torch.Tensor:
    """q [B, NH, nope + R] (one token per sequence), ctx [B, S, C + R] -> [B, NH * v]."""
    B = q.shape[0]
    nope, C = spec.qk_nope_head_dim, spec.kv_lora_rank
    w_uk, w_uv_t = absorbed_weights(w, spec, NH)
    q_lat = torch.bmm(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [B, NH, C]
    qf = torch.cat((q_lat, q[..., nope:]), dim=-1)[:, None]  # [B, 1, NH, C + R]
    ctx = ctx[:, None]  # one shared KV head: [B, 1, S, C + R]
    out = F.scaled_dot_product_attention(qf, ctx, ctx[..., :C], attn_mask=meta.attn_mask,
                                         scale=spec.softmax_scale)  # [B, 1, NH, C]
    out = torch.bmm(out[:, 0].transpose(0, 1), w_uv_t)  # [NH, B, v]
    return out.transpose(0, 1).reshape(B, -1)
