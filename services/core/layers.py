"""Stateless building blocks: RMSNorm, RoPE, paged GQA attention, router, grouped expert FFN.

Plain functions over tensors (weights passed in), device-agnostic: the same code runs on CPU and
CUDA. Numerics follow Hugging Face transformers (norm in float32, router softmax in float32,
RoPE angles in float32) so that greedy decoding matches it token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.core.batch import BatchMeta


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dim, computed in float32."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, 1, D]`` for absolute ``positions`` [T] (half-rotation layout)."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return ((emb.cos() * scale).to(dtype)[:, None, :], (emb.sin() * scale).to(dtype)[:, None, :])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, D] by the tables from :func:`rope_cos_sin`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
    """Write this step's K/V into the paged cache, then attend over each sequence's context.

    q [T, NH, D]; k, v [T, KVH, D]; k_cache, v_cache [num_blocks, block_size, KVH, D] (one
    layer, written in place). Returns [T, NH * D].
    """
    T, NH, D = q.shape
    KVH = k.shape[1]
    B, qmax, smax = meta.num_seqs, meta.max_query_len, meta.max_seq_len
    k_cache.view(-1, KVH, D).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, KVH, D).index_copy_(0, meta.slot_mapping, v)
    # Gather each sequence's context through its block table: [B, KVH, S, D].
    flat_tables = meta.block_tables.view(-1)
    keys = k_cache.index_select(0, flat_tables).view(B, -1, KVH, D)[:, :smax].transpose(1, 2)
    vals = v_cache.index_select(0, flat_tables).view(B, -1, KVH, D)[:, :smax].transpose(1, 2)
    if qmax == 1:  # pure decode: the flat layout already is [B, 1]
        qp = q.view(B, 1, NH, D)
    else:
        qp = q.new_zeros(B * qmax, NH, D).index_copy_(0, meta.q_gather, q).view(B, qmax, NH, D)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, vals, attn_mask=meta.attn_mask,
                                         scale=scale, enable_gqa=NH != KVH)
    out = out.transpose(1, 2).reshape(B * qmax, NH * D)
    return out if qmax == 1 else out.index_select(0, meta.q_gather)


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over experts -> top-k -> optional renormalisation.

    x [T, H], router_weight [E, H] -> (topk_ids [T, K] int64, topk_weights [T, K] x.dtype).
    """
    probs = torch.softmax(F.linear(x, router_weight).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(x.dtype)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with gate/up fused: gate_up [2I, H], down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def grouped_expert_ffn(rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                       gate_up_t: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
    """Weighted sum over k of ``FFN_{local_ids[n,k]}(rows[n])``; ids < 0 contribute nothing.

    rows [N, H]; local_ids [N, K] int64 indexing the stacked, *input-major* weights
    gate_up_t [n, H, 2I] (gate columns, then up) and down_t [n, I, H] (contiguous, so batched
    GEMMs need no per-call transpose copy); weights [N, K]. Token rows are sorted by expert so
    each expert that has rows runs one GEMM over all of them (loop over experts, never over
    tokens); when the groups are balanced they are padded and run as one batched GEMM per
    projection. Returns [N, H].
    """
    N, K = local_ids.shape
    out = torch.zeros_like(rows)
    flat = local_ids.reshape(-1)
    sel = (flat >= 0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return out
    ids = flat[sel]
    order = torch.argsort(ids, stable=True)
    sel, ids = sel[order], ids[order]
    token = sel // K
    x = rows.index_select(0, token)
    w = weights.reshape(-1)[sel].to(rows.dtype)
    n = gate_up_t.shape[0]
    counts_t = torch.bincount(ids, minlength=n)
    counts = counts_t.tolist()  # one host sync per layer
    M, cmax = len(ids), max(counts)
    if 4 * n * cmax <= 5 * M:
        # Balanced routing (small decode batches): pad groups to [n, cmax, H] and run two
        # batched GEMMs instead of 2 x (experts with rows) tiny ones.
        starts = torch.cumsum(counts_t, 0) - counts_t
        pos = torch.arange(M, device=rows.device) - starts[ids]
        xp = rows.new_zeros(n, cmax, rows.shape[1])
        xp[ids, pos] = x
        gate, up = torch.bmm(xp, gate_up_t).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, down_t)[ids, pos]
    else:  # skewed routing: one GEMM per expert that has rows, no padding waste
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                gate, up = (x[start:start + c] @ gate_up_t[e]).chunk(2, dim=-1)
                outs.append((F.silu(gate) * up) @ down_t[e])
                start += c
        y = torch.cat(outs)
    return out.index_add_(0, token, y * w[:, None])
