"""gpt-oss compute pieces: attention with learned sinks and per-layer sliding windows, and the
clamped SwiGLU of its experts.

**Sinks.** Each head has a learned logit ``s_h`` that joins the softmax as one more "key" with
no value: ``p = softmax([q k^T * scale, s_h])[:-1]``, so a head can put weight on nothing.
SDPA has no such term, so these layers run the eager form transformers runs (scores, mask,
sink column, max-subtracted softmax, drop the sink, times V) over the same gathered paged
context as :func:`layers.paged_attention`.

**Windows.** gpt-oss alternates ``sliding_attention`` and ``full_attention`` layers
(``layer_types``) in one model. The step's batch mask is the full causal one; a sliding layer
narrows it to keys ``k > q - window`` (transformers' ``sliding_window_overlay``), the query
position of each mask row being its count of visible keys minus one. The paged cache keeps
every token (no eviction), so both layer kinds read the same blocks.

**Clamped SwiGLU.** ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
``out = (up + 1) * gate * sigmoid(alpha * gate)``; the checkpoint interleaves gate and up
columns, which loading de-interleaves into the ``[gate | up]`` halves every family uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.core import layers as L
from services.core.batch import BatchMeta


def window_mask(mask: torch.Tensor, window: int) -> torch.Tensor:
    """The causal bool mask ``[B, 1, Q, S]`` narrowed to the last ``window`` positions."""
    q_pos = mask.sum(dim=-1, keepdim=True) - 1  # [B, 1, Q, 1]
    k_pos = torch.arange(mask.shape[-1], device=mask.device)
    return mask & (k_pos > q_pos - window)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, meta: BatchMeta, scale: float,
                   sinks: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """:func:`layers.paged_attention` (same arguments and cache layout; ``mask`` replaces
    ``meta.attn_mask``) in the eager form, with the per-head sink logits ``sinks`` [NH]
    (None: none). Returns [T, NH * D]."""
    T, NH, D = q.shape
    KVH = k.shape[1]
    B, qmax, smax = meta.num_seqs, meta.max_query_len, meta.max_seq_len
    keys, vals = L.write_and_gather_kv(k, v, k_cache, v_cache, meta)
    G = NH // KVH  # head h = kvh * G + g, as transformers' repeat_kv
    keys = keys[:, :, None].expand(B, KVH, G, smax, D).reshape(B, NH, smax, D)
    vals = vals[:, :, None].expand(B, KVH, G, smax, D).reshape(B, NH, smax, D)
    qp = q.new_zeros(B * qmax, NH, D).index_copy_(0, meta.q_gather, q).view(B, qmax, NH, D)
    scores = torch.matmul(qp.transpose(1, 2), keys.transpose(2, 3)) * scale  # [B, NH, Q, S]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, NH, 1, 1).expand(B, NH, qmax, 1)
        scores = torch.cat((scores, sink), dim=-1)
    scores = scores - scores.max(dim=-1, keepdim=True).values
    probs = F.softmax(scores, dim=-1, dtype=scores.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs.to(vals.dtype), vals)  # [B, NH, Q, D]
    return out.transpose(1, 2).reshape(B * qmax, NH * D).index_select(0, meta.q_gather)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up [N, 2I] as ``[gate | up]`` -> [N, I] (gpt-oss's expert activation)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def deinterleave(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Columns (or rows) ``g0, u0, g1, u1, ...`` along ``dim`` -> ``g0, g1, ..., u0, u1, ...``."""
    idx = torch.arange(w.shape[dim], device=w.device)
    order = torch.cat((idx[0::2], idx[1::2]))
    return w.index_select(dim, order)
