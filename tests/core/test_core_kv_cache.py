"""Paged KV cache: block bookkeeping, and a small shared pool reused across batches."""

from __future__ import annotations

import pytest
import torch

from services.core.batch import build_batch_meta
from services.core.generate import generate
from services.core.kv_cache import BlockManager, KVCacheFull
from services.core.model import MonolithicModel
from services.core.request import SamplingParams


def test_block_manager_allocate_append_free():
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.allocate("a", 6)  # 2 blocks reserved
    assert bm.num_free_blocks == 3
    bm.append_slots("a", 6)
    table = bm.block_table("a")
    assert bm.seq_len("a") == 6 and len(table) == 2 and bm.num_free_blocks == 3
    bm.append_slots("a", 3)  # crosses into a third block
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 2
    assert not bm.can_allocate(9) and bm.can_allocate(8)
    bm.allocate("b")
    with pytest.raises(KVCacheFull):
        bm.append_slots("b", 9)
    assert bm.seq_len("b") == 0 and bm.num_free_blocks == 2  # failed append changed nothing
    used = set(bm.block_table("a"))
    bm.free("a")
    assert "a" not in bm and bm.num_free_blocks == 5 and bm.usage == 0.0
    bm.append_slots("b", 12)
    assert set(bm.block_table("b")) == used  # freed blocks are reused first
    with pytest.raises(ValueError):
        bm.allocate("b")


def _run_batch(model, bm, kv, prompts, new_tokens, tag):
    """Greedy decode ``prompts`` through a caller-owned pool (what an engine does)."""
    ids = [(tag, i) for i in range(len(prompts))]
    outs = [[] for _ in prompts]
    tokens = [list(p) for p in prompts]
    for i in ids:
        bm.allocate(i)
    for _ in range(new_tokens):
        starts = [bm.seq_len(i) for i in ids]
        for i, t in zip(ids, tokens, strict=True):
            bm.append_slots(i, len(t))
        meta = build_batch_meta([bm.block_table(i) for i in ids], starts,
                                [len(t) for t in tokens], bm.block_size)
        flat = torch.tensor([x for t in tokens for x in t])
        picked = model.forward(flat, meta, kv).argmax(-1).tolist()
        for o, t in zip(outs, picked, strict=True):
            o.append(t)
        tokens = [[t] for t in picked]
    return ids, outs


def test_small_pool_shared_freed_and_reused(mixtral_dir):
    model = MonolithicModel.from_pretrained(mixtral_dir)
    batch1 = [[7, 8, 9, 10, 11], [1, 2], list(range(40, 53))]
    batch2 = [list(range(200, 230)), [5]]
    n = 10
    bs = 3
    bm = BlockManager(1, bs)  # only for blocks_needed
    need1 = sum(bm.blocks_needed(len(p) + n - 1) for p in batch1)
    need2 = sum(bm.blocks_needed(len(p) + n - 1) for p in batch2)
    bm = BlockManager(max(need1, need2), bs)  # fits either batch, never both at once
    assert need1 + need2 > bm.num_blocks
    kv = model.new_kv_cache(bm.num_blocks, bs)
    ids1, out1 = _run_batch(model, bm, kv, batch1, n, "one")
    with pytest.raises(KVCacheFull):
        _run_batch(model, bm, kv, batch2, n, "early")
    for i in list(ids1) + [("early", 0), ("early", 1)]:
        if i in bm:
            bm.free(i)
    assert bm.num_free_blocks == bm.num_blocks
    _, out2 = _run_batch(model, bm, kv, batch2, n, "two")  # reuses (dirty) blocks of batch 1
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    # Reference: a roomy pool with one big block per sequence (contiguous KV).
    assert out1 == generate(model, batch1, params, block_size=64)
    assert out2 == generate(model, batch2, params, block_size=64)


def test_mixed_prefill_and_decode_in_one_step(mixtral_dir):
    """A prefill chunk and decode tokens of other sequences share one forward."""
    model = MonolithicModel.from_pretrained(mixtral_dir)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8]
    want_a, want_b = generate(model, [a, b], params)
    bm, kv = BlockManager(16, 2), model.new_kv_cache(16, 2)
    bm.allocate("a")
    bm.append_slots("a", len(a))
    meta = build_batch_meta([bm.block_table("a")], [0], [len(a)], 2)
    first_a = int(model.forward(torch.tensor(a), meta, kv).argmax(-1))
    # step 2: decode token of "a" + chunked prefill of "b" (two chunks: 4 then 2 tokens)
    bm.allocate("b")
    bm.append_slots("a", 1)
    bm.append_slots("b", 4)
    meta = build_batch_meta([bm.block_table("a"), bm.block_table("b")], [len(a), 0], [1, 4], 2)
    logits = model.forward(torch.tensor([first_a] + b[:4]), meta, kv)
    second_a = int(logits[0].argmax())
    bm.append_slots("b", 2)
    meta = build_batch_meta([bm.block_table("b")], [4], [2], 2)
    first_b = int(model.forward(torch.tensor(b[4:]), meta, kv).argmax(-1))
    assert [first_a, second_a] == want_a[:2]
    assert first_b == want_b[0]
