"""Multi-head latent attention (DeepSeek-V2/V3) over the paged latent cache.

Per token and layer the cache keeps one ``[C + R]`` entry: the normalised KV latent
(``kv_a_layernorm(kv_a_proj(x))[:C]``, C = kv_lora_rank) and the rotated rope key (R =
qk_rope_head_dim) that every head shares. That is ``C + R`` numbers instead of
``NH * (qk_head_dim + v_head_dim)`` for per-head K/V (576 vs 40960 for DeepSeek-V3).

Each step expands the gathered context through ``kv_b_proj`` into per-head ``k_nope`` and
``v`` and runs SDPA, which is exactly what transformers computes (so greedy fp32 decoding
matches it token for token). The weight-absorbed form (attention in latent space, no
expansion) is the faster decode kernel and is not implemented yet.

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
                  meta: BatchMeta) -> torch.Tensor:
    """x [T, H] (after input_layernorm) -> attention output [T, NH * v] before ``o_proj``.

    ``cache`` is the layer's latent cache ``[1, num_blocks, block_size, C + R]``; this step's
    entries are written at ``meta.slot_mapping`` before attending.
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
    kv_full = F.linear(ctx[..., :C], w.kv_b).view(B, smax, NH, nope + vd).transpose(1, 2)
    k_nope, values = kv_full[..., :nope], kv_full[..., nope:]  # [B, NH, S, nope], [.., vd]
    keys = torch.cat((k_nope, ctx[:, None, :, C:].expand(B, NH, smax, R)), dim=-1)
    qp = q.new_zeros(B * qmax, NH, nope + R).index_copy_(0, meta.q_gather, q)
    qp = qp.view(B, qmax, NH, nope + R).transpose(1, 2)  # [B, NH, qmax, nope + R]
    out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=meta.attn_mask,
                                         scale=spec.softmax_scale)  # [B, NH, qmax, vd]
    return out.transpose(1, 2).reshape(B * qmax, NH * vd).index_select(0, meta.q_gather)
