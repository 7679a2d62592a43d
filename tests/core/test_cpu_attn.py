"""Decode attention over the paged KV cache (services/core/_cpu_attn.c) against the gather +
SDPA path it replaces, and its refusals."""

from __future__ import annotations

import random

import pytest
import torch

from services.core import cpu_attn, cpu_gemm, layers
from services.core.batch import build_batch_meta

needs_kernel = pytest.mark.skipif(not cpu_attn.ACTIVE, reason=f"kernel off: {cpu_attn.REASON}")
BS = 4


def _step(B: int, NH: int, KVH: int, D: int, seed: int):
    """A decode step over B sequences of random lengths with shuffled blocks: (q, k, v,
    k_cache, v_cache, meta) with the caches holding every context but the new token."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lens = [rng.randint(1, 23) for _ in range(B)]
    blocks = list(range(sum(-(-n // BS) for n in lens) + 3))
    rng.shuffle(blocks)
    tables, at = [], 0
    for n in lens:
        tables.append(blocks[at:at + -(-n // BS)])
        at += len(tables[-1])
    nblocks = len(blocks)
    k_cache = torch.randn(KVH, nblocks, BS, D, generator=g)
    v_cache = torch.randn(KVH, nblocks, BS, D, generator=g)
    meta = build_batch_meta(tables, [n - 1 for n in lens], [1] * B, BS)
    q, k, v = (torch.randn(B, h, D, generator=g) for h in (NH, KVH, KVH))
    return q, k, v, k_cache, v_cache, meta


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B,NH,KVH,D", [(5, 4, 2, 64), (1, 2, 2, 8), (7, 8, 1, 24)])
def test_paged_decode_equals_gather_and_sdpa(threads, B, NH, KVH, D):
    q, k, v, kc, vc, meta = _step(B, NH, KVH, D, seed=B * 31 + D)
    kc2, vc2 = kc.clone(), vc.clone()
    cpu_gemm.set_kernel_threads(threads)
    try:
        assert cpu_attn.usable(q, kc, meta)
        got = layers.paged_attention(q, k, v, kc, vc, meta, 0.3)  # the kernel
    finally:
        cpu_gemm.set_kernel_threads(None)
    keys, vals = layers.write_and_gather_kv(k, v, kc2, vc2, meta)  # the torch path
    want = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B, KVH, NH // KVH, D), keys, vals, attn_mask=meta.attn_mask,
        scale=0.3).reshape(B, NH * D)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the new K/V written alike
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@needs_kernel
def test_paged_decode_refuses_what_it_cannot_serve():
    q, k, v, kc, vc, meta = _step(3, 4, 2, 16, seed=1)
    assert not cpu_attn.usable(q.double(), kc, meta)
    assert not cpu_attn.usable(q[..., :12], kc, meta)  # head size not a multiple of 8
    windowed = build_batch_meta([[0, 1]], [5], [1], BS, sliding_window=4)
    assert not cpu_attn.usable(q[:1], kc, windowed)
    prefill = build_batch_meta([[0, 1]], [0], [5], BS)
    assert not cpu_attn.usable(q[:1], kc, prefill)
    meta.block_tables[0, 0] = kc.shape[1]  # a block id past the pool: refused in C
    with pytest.raises(ValueError, match="outside"):
        cpu_attn.paged_decode(q, kc, vc, meta, 1.0)
