"""The decode fast paths agree with straightforward references (meta, grouped experts)."""

from __future__ import annotations

import random

import pytest
import torch

from services.core import cpu_gemm
from services.core.batch import build_batch_meta
from services.core.layers import _grouped_ffn_loop, grouped_expert_ffn


def test_batch_meta_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        B, bs = rng.randint(1, 5), rng.choice([1, 2, 4, 16])
        starts = [rng.randint(0, 30) for _ in range(B)]
        qlens = [rng.randint(1, 6) for _ in range(B)]
        tables = [[rng.randint(0, 99) for _ in range(-(-(s + q) // bs) + rng.randint(0, 1))]
                  for s, q in zip(starts, qlens, strict=True)]
        window = rng.choice([None, 3])
        meta = build_batch_meta(tables, starts, qlens, bs, "cpu", window)
        qmax, smax = max(qlens), max(s + q for s, q in zip(starts, qlens, strict=True))
        pos = [p for s, q in zip(starts, qlens, strict=True) for p in range(s, s + q)]
        seq = [b for b, q in enumerate(qlens) for _ in range(q)]
        assert meta.positions.tolist() == pos
        assert meta.slot_mapping.tolist() == [tables[b][p // bs] * bs + p % bs
                                              for b, p in zip(seq, pos, strict=True)]
        assert meta.block_tables.shape == (B, max(len(t) for t in tables))
        assert meta.last_index.tolist() == [sum(qlens[:b + 1]) - 1 for b in range(B)]
        assert meta.attn_mask.shape == (B, 1, qmax, smax)
        for b in range(B):
            for i in range(qmax):
                qp = starts[b] + min(i, qlens[b] - 1)
                want = [k <= qp and (window is None or k > qp - window) for k in range(smax)]
                assert meta.attn_mask[b, 0, i].tolist() == want


@pytest.mark.parametrize("layout", ["torch", "packed"])
def test_grouped_ffn_matches_per_expert_loop_with_missing_ids(layout):
    if layout == "packed" and not cpu_gemm.ACTIVE:
        pytest.skip(f"packed CPU kernel off: {cpu_gemm.REASON}")
    g = torch.Generator().manual_seed(0)
    n, H, inter, N, K = 5, 16, 24, 23, 2  # 2 * inter and H: multiples of 16 (packed panels)
    gate_up, down = torch.randn(n, H, 2 * inter, generator=g), torch.randn(n, inter, H,
                                                                          generator=g)
    rows, weights = torch.randn(N, H, generator=g), torch.rand(N, K, generator=g)
    ids = torch.randint(-1, n, (N, K), generator=g)  # -1: expert not held here
    ids[0] = -1  # a row with no expert at all
    stacks = (gate_up, down) if layout == "torch" else (cpu_gemm.pack(gate_up),
                                                         cpu_gemm.pack(down))
    got = grouped_expert_ffn(rows, ids, weights, *stacks)
    want = _grouped_ffn_loop(rows, ids, weights, gate_up, down)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], torch.zeros(H))
    empty = grouped_expert_ffn(rows[:0], ids[:0], weights[:0], *stacks)
    assert empty.shape == (0, H)
