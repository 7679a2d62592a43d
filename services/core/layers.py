"""Stateless building blocks: RMSNorm, RoPE, paged GQA attention, router, grouped expert FFN.

Plain functions over tensors (weights passed in), device-agnostic: the same code runs on CPU and
CUDA. Numerics follow Hugging Face transformers (norm in float32, router softmax in float32,
RoPE angles in float32) so that greedy decoding matches it token for token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from services.core import cpu_attn, cpu_gemm, routing
from services.core.batch import BatchMeta
from services.core.routing import RouterSpec

# Stacked expert weights: input-major [n, K, N] tensors, or packed for the CPU kernel.
ExpertStack = torch.Tensor | cpu_gemm.PackedWeight
Linear = torch.Tensor | cpu_gemm.PackedLinear  # a dense layer's weight [N, K], maybe packed


def packed_or(w: torch.Tensor, bias: torch.Tensor | None = None
              ) -> tuple[Linear, torch.Tensor | None]:
    """``(weight, bias)`` for :func:`linear`: packed for the CPU kernel where it serves them
    (CPU float32; services/core/cpu_gemm.py), else as given."""
    if cpu_gemm.linear_usable(w):
        return cpu_gemm.pack_linear(w, bias), None
    return w, bias


def linear(x: torch.Tensor, w: Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the packed CPU kernel for a :class:`cpu_gemm.PackedLinear` (which holds
    its bias)."""
    if isinstance(w, cpu_gemm.PackedLinear):
        return cpu_gemm.linear(x, w)
    return F.linear(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dim, computed in float32."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # One fused kernel instead of six ops; for float32 it is the same formula (no casts).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without bias over the last dim (DBRX), in x's dtype as ``nn.LayerNorm``."""
    return F.layer_norm(x, (x.shape[-1],), weight, None, eps)


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


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, for :func:`apply_rope_signed` (once per step)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
                      ) -> torch.Tensor:
    """Same result as :func:`apply_rope` bit for bit (negation is exact), in fewer ops:
    ``cat(-x2, x1) * sin == roll(x, D/2) * cat(-sin1, sin2)``."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: BatchMeta) -> None:
    """Write the step's ``k``/``v`` [T, KVH, D] into their slots of the head-major caches
    ``[KVH, num_blocks, block_size, D]``."""
    KVH, D = k.shape[1], k.shape[2]
    k_cache.view(KVH, -1, D).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.view(KVH, -1, D).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))


def write_and_gather_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: BatchMeta
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the step's ``k``/``v`` [T, KVH, D] into their cache slots, then gather each
    sequence's context through its block table: keys, values [B, KVH, S, D] (strided views;
    the gather is one ``index_select`` over whole blocks per tensor)."""
    KVH, D = k.shape[1], k.shape[2]
    B, smax = meta.num_seqs, meta.max_seq_len
    write_kv(k, v, k_cache, v_cache, meta)
    flat_tables = meta.block_tables.view(-1)
    keys = k_cache.index_select(1, flat_tables).view(KVH, B, -1, D)[:, :, :smax].transpose(0, 1)
    vals = v_cache.index_select(1, flat_tables).view(KVH, B, -1, D)[:, :, :smax].transpose(0, 1)
    return keys, vals


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: BatchMeta, scale: float) -> torch.Tensor:
    """Write this step's K/V into the paged cache, then attend over each sequence's context.

    q [T, NH, D]; k, v [T, KVH, D]; k_cache, v_cache [KVH, num_blocks, block_size, D] (one
    layer, head-major, written in place). Returns [T, NH * D].

    The cache is head-major so that the gathered context of one (sequence, head) is one
    contiguous ``[S, D]`` run, the layout SDPA reads fastest. The gather is one
    ``index_select`` over whole blocks per tensor (a memcpy per block; advanced indexing
    ``cache[tables]`` is several times slower on CPU).
    """
    T, NH, D = q.shape
    KVH = k.shape[1]
    B, qmax = meta.num_seqs, meta.max_query_len
    if cpu_attn.usable(q, k_cache, meta):  # CPU decode: read K/V where they lie, no gather
        write_kv(k, v, k_cache, v_cache, meta)
        return cpu_attn.paged_decode(q, k_cache, v_cache, meta, scale)
    keys, vals = write_and_gather_kv(k, v, k_cache, v_cache, meta)
    if qmax == 1:
        # Pure decode: fold each KV head's G = NH / KVH query heads into the query-length
        # dim ([B, KVH, G, D], head h = kvh * G + g as in GQA): half the SDPA work items,
        # no GQA broadcast, and the output is already [B, NH * D] in memory order.
        out = F.scaled_dot_product_attention(q.reshape(B, KVH, NH // KVH, D), keys, vals,
                                             attn_mask=meta.attn_mask, scale=scale)
        return out.reshape(B, NH * D)
    qp = q.new_zeros(B * qmax, NH, D).index_copy_(0, meta.q_gather, q).view(B, qmax, NH, D)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, vals, attn_mask=meta.attn_mask,
                                         scale=scale, enable_gqa=NH != KVH)
    return out.transpose(1, 2).reshape(B * qmax, NH * D).index_select(0, meta.q_gather)


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool,
          keep_float32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over experts -> top-k -> optional renormalisation (Mixtral/Qwen3
    spelling of :func:`services.core.routing.route`, which every family goes through).

    x [T, H], router_weight [E, H] -> (topk_ids [T, K] int64, topk_weights [T, K]: float32
    when ``keep_float32``, else rounded to x.dtype, as the family does in transformers).
    """
    spec = RouterSpec(num_experts=router_weight.shape[0], top_k=top_k,
                      norm_topk_prob=renormalize, weights_float32=keep_float32)
    return routing.route(x, router_weight, spec)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with gate/up fused: gate_up [2I, H], down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


# (device type, dtype) -> whether torch._grouped_mm runs there; probed on first use.
_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_supported(t: torch.Tensor) -> bool:
    key = (t.device.type, t.dtype)
    ok = _GROUPED_MM_OK.get(key)
    if ok is None:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:  # tiny probe: 2 groups of 8 x 16 @ 16 x 16 (16-byte aligned for CUDA)
                x = torch.ones(16, 16, dtype=t.dtype, device=t.device)
                w = torch.ones(2, 16, 16, dtype=t.dtype, device=t.device)
                offs = torch.tensor([8, 16], dtype=torch.int32, device=t.device)
                y = torch._grouped_mm(x, w, offs=offs)
                ok = bool(torch.all(y == 16).item())
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return ok


# [N, 2I] as [gate | up] -> [N, I]; None: SwiGLU, silu(gate) * up
Activation = Callable[[torch.Tensor], torch.Tensor] | None


def _act(act: Activation, gate_up: torch.Tensor) -> torch.Tensor:
    if act is not None:
        return act(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_expert_ffn(rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                       gate_up_t: ExpertStack, down_t: ExpertStack, act: Activation = None,
                       gate_up_bias: torch.Tensor | None = None,
                       down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over k of ``FFN_{local_ids[n,k]}(rows[n])``; ids < 0 contribute nothing.

    rows [N, H]; local_ids [N, K] int64 indexing the stacked, *input-major* weights
    gate_up_t [n, H, 2I] (gate columns, then up) and down_t [n, I, H] (contiguous, so batched
    GEMMs need no per-call transpose copy); weights [N, K]. Token rows are sorted by expert so
    each expert that has rows runs one GEMM over all of them (never a loop over tokens).
    Where ``torch._grouped_mm`` runs (CPU; GPUs that support the dtype) both projections are
    one grouped GEMM each, with the group offsets kept on the device: no host sync and no
    Python loop over experts. Elsewhere: one GEMM pair per expert that has rows. The weights
    may instead be :class:`cpu_gemm.PackedWeight` (packed once at load, see ``cpu_gemm``): then
    the same grouped schedule runs on that kernel. ``act`` replaces the SwiGLU (gpt-oss);
    ``gate_up_bias`` [n, 2I] and ``down_bias`` [n, H] are the experts' biases (gpt-oss).
    Returns [N, H].
    """
    bias = (gate_up_bias, down_bias)
    if isinstance(gate_up_t, cpu_gemm.PackedWeight):
        if not rows.shape[0]:
            return torch.zeros_like(rows)
        return _grouped_ffn_gmm(rows, local_ids, weights, gate_up_t, down_t, act, *bias)
    if rows.shape[0] and gate_up_t.shape[0] and _grouped_mm_supported(rows):
        return _grouped_ffn_gmm(rows, local_ids, weights, gate_up_t, down_t, act, *bias)
    return _grouped_ffn_loop(rows, local_ids, weights, gate_up_t, down_t, act, *bias)


def _torch_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offs)


def _row_bias(bias: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """bias [n, X] -> [M, X] for rows of experts ``expert`` [M] (ids == n: a zero row)."""
    return torch.cat((bias, bias.new_zeros(1, bias.shape[1]))).index_select(0, expert)


def _grouped_ffn_gmm(rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                     gate_up_t: ExpertStack, down_t: ExpertStack, act: Activation = None,
                     gate_up_bias: torch.Tensor | None = None,
                     down_bias: torch.Tensor | None = None) -> torch.Tensor:
    packed = isinstance(gate_up_t, cpu_gemm.PackedWeight)
    mm = cpu_gemm.grouped_gemm if packed else _torch_grouped_mm
    K = local_ids.shape[1]
    n = gate_up_t.shape[0]
    flat = local_ids.reshape(-1)  # [N*K]
    # "No expert" ids (< 0) need masking. On CPU checking costs nothing, so the common
    # all-valid case skips the mask; on a GPU the check would be a host sync, so always mask.
    masked = rows.device.type != "cpu" or bool((flat < 0).any())
    key = torch.where(flat < 0, n, flat) if masked else flat  # invalid sorts after every group
    # Stable: a token's K contributions are summed in expert order (as transformers does).
    order = torch.argsort(key, stable=True)
    token = order // K
    x = rows.index_select(0, token)  # [N*K, H], grouped by expert
    counts = torch.bincount(key, minlength=n + 1)[:n] if masked else torch.bincount(key,
                                                                                    minlength=n)
    offs = counts.cumsum(0, dtype=torch.int32)  # group end offsets, stay on the device
    gate_up = mm(x, gate_up_t, offs)
    # each row's expert (n: none), for the per-expert biases
    expert = key.index_select(0, order) if gate_up_bias is not None or down_bias is not None \
        else None
    if gate_up_bias is not None:
        gate_up = gate_up + _row_bias(gate_up_bias, expert)
    y = mm(_act(act, gate_up), down_t, offs)  # rows past offs[-1]: garbage (torch) or 0
    if down_bias is not None:
        y = y + _row_bias(down_bias, expert)
    # weights in float32 or the compute dtype (route): the product is rounded once, to rows'
    # dtype, before the sum over k, as transformers does
    y = (y * weights.reshape(-1).index_select(0, order)[:, None]).to(rows.dtype)
    if masked:  # where, not a multiply by 0: the garbage rows may hold NaN/inf
        y = torch.where((key.index_select(0, order) < n)[:, None], y, 0)
    return torch.zeros_like(rows).index_add_(0, token, y)


def _grouped_ffn_loop(rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                      gate_up_t: torch.Tensor, down_t: torch.Tensor, act: Activation = None,
                      gate_up_bias: torch.Tensor | None = None,
                      down_bias: torch.Tensor | None = None) -> torch.Tensor:
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
    w = weights.reshape(-1)[sel]
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
        gate_up = torch.bmm(xp, gate_up_t)
        if gate_up_bias is not None:
            gate_up = gate_up + gate_up_bias[:, None]
        y = torch.bmm(_act(act, gate_up), down_t)
        if down_bias is not None:
            y = y + down_bias[:, None]
        y = y[ids, pos]
    else:  # skewed routing: one GEMM per expert that has rows, no padding waste
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                gate_up = x[start:start + c] @ gate_up_t[e]
                if gate_up_bias is not None:
                    gate_up = gate_up + gate_up_bias[e]
                y_e = _act(act, gate_up) @ down_t[e]
                outs.append(y_e if down_bias is None else y_e + down_bias[e])
                start += c
        y = torch.cat(outs)
    return out.index_add_(0, token, (y * w[:, None]).to(rows.dtype))
