"""The all-decode meta (one token per sequence) agrees with a brute-force reference."""

from __future__ import annotations

import random

import torch

from services.core.batch import build_batch_meta

torch.set_num_threads(1)


def test_decode_meta_matches_brute_force():
    rng = random.Random(1)
    for _ in range(100):
        B, bs = rng.randint(1, 9), rng.choice([1, 2, 4, 16])
        starts = [rng.randint(0, 60) for _ in range(B)]
        tables = [[rng.randint(0, 199) for _ in range(-(-(s + 1) // bs) + rng.randint(0, 2))]
                  for s in starts]
        window = rng.choice([None, 1, 5])
        meta = build_batch_meta(tables, starts, [1] * B, bs, "cpu", window)
        smax, nbmax = max(starts) + 1, max(len(t) for t in tables)
        assert meta.positions.tolist() == starts
        assert meta.slot_mapping.tolist() == [t[p // bs] * bs + p % bs
                                              for t, p in zip(tables, starts, strict=True)]
        assert meta.block_tables.tolist() == [t + [0] * (nbmax - len(t)) for t in tables]
        assert meta.q_gather.tolist() == meta.last_index.tolist() == list(range(B))
        assert (meta.query_lens, meta.max_query_len, meta.max_seq_len) == ((1,) * B, 1, smax)
        assert meta.seq_lens == tuple(s + 1 for s in starts)
        assert meta.attn_mask.shape == (B, 1, 1, smax) and meta.attn_mask.dtype == torch.bool
        for b, p in enumerate(starts):
            want = [k <= p and (window is None or k > p - window) for k in range(smax)]
            assert meta.attn_mask[b, 0, 0].tolist() == want
