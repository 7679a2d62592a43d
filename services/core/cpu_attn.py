"""Decode attention over the paged KV cache on CPU (the C kernel in ``_cpu_attn.c``).

:func:`services.core.layers.paged_attention` calls :func:`paged_decode` for a pure decode
step (one query token per sequence) when :func:`usable` says so: the kernel built, AVX2 +
FMA, float32 CPU tensors, a head size that is a multiple of 8, and no sliding window (the
window lives in the torch path's mask). Everywhere else the gather + SDPA path runs.
With :func:`cpu_gemm.kernel_threads` > 1 the (sequence, KV head) items are split into that many
runs of about equal context, one kernel call each on :func:`cpu_gemm.worker_pool` (the
kernel releases the GIL). ``MEGASCALE_CPU_ATTN=0`` in the environment (read at import)
turns it off, for A/B runs.
"""

from __future__ import annotations

import itertools

import torch

from services.core.batch import BatchMeta
from services.core.cpu_gemm import kernel_threads, load_extension, worker_pool

_API_VERSION = 1  # must match API_VERSION in _cpu_attn.c
_ext, REASON = load_extension("_cpu_attn", _API_VERSION, "MEGASCALE_CPU_ATTN")
ACTIVE: bool = _ext is not None


def usable(q: torch.Tensor, k_cache: torch.Tensor, meta: BatchMeta) -> bool:
    """Whether :func:`paged_decode` serves this step (see the module docstring)."""
    return (ACTIVE and meta.max_query_len == 1 and meta.sliding_window is None
            and q.device.type == "cpu" and q.dtype == torch.float32
            and k_cache.dtype == torch.float32 and q.shape[-1] % 8 == 0)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: BatchMeta, scale: float) -> torch.Tensor:
    """Attention of ``q [B, NH, D]`` (token b is sequence b's only new one, its K/V already
    written) over each sequence's context in ``k_cache``/``v_cache`` ``[KVH, num_blocks,
    block_size, D]``. Returns ``[B, NH * D]``, as SDPA's path does."""
    B, NH, D = q.shape
    KVH, num_blocks, bs, _ = k_cache.shape
    if _ext is None:
        raise RuntimeError(f"the CPU paged attention is not available: {REASON}")
    if (meta.max_query_len != 1 or meta.num_seqs != B or NH % KVH
            or k_cache.shape != v_cache.shape or k_cache.shape[3] != D):
        raise ValueError(f"paged_decode: q {tuple(q.shape)} does not fit the caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} and {B} sequences")
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    tables = meta.block_tables.contiguous()
    lens = torch.tensor(meta.seq_lens, dtype=torch.int64)
    out = torch.empty(B, NH, D, dtype=torch.float32)
    fixed = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
             tables.data_ptr(), lens.data_ptr(), B, NH, KVH, D, bs, tables.shape[1],
             num_blocks)
    items = B * KVH
    runs = min(kernel_threads(), items)
    if runs == 1:
        _ext.paged_decode(*fixed, 0, items, scale)
        return out.view(B, NH * D)
    # cut the items into runs of about equal context (the work is linear in it)
    ends = list(itertools.accumulate(meta.seq_lens[w // KVH] for w in range(items)))
    cut, target = [0], ends[-1] / runs
    for w, e in enumerate(ends):
        if len(cut) < runs and e >= target * len(cut) and w + 1 < items:
            cut.append(w + 1)
    cut.append(items)
    pool = worker_pool(len(cut) - 2) if len(cut) > 2 else None
    futures = [pool.submit(_ext.paged_decode, *fixed, w0, w1, scale)
               for w0, w1 in zip(cut[1:-1], cut[2:], strict=True)] if pool else []
    _ext.paged_decode(*fixed, cut[0], cut[1], scale)
    for f in futures:
        f.result()
    return out.view(B, NH * D)
