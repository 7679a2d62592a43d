"""Unit tests of prefix caching: the block hash chain, the refcounted block pool with LRU
eviction, and the batcher admitting a request after its cached prefix."""

from __future__ import annotations

import argparse

import pytest

from services.attention.batching import Batcher, BatchingConfig, Request, Status
from services.attention.main import add_arguments
from services.attention.prefix_cache import PrefixCachingBlockManager
from services.core.kv_cache import KVCacheFull
from services.core.prefix_hash import chain_hashes, extend_chain
from services.core.request import FinishReason, SamplingParams
from services.errors import ConfigError

BS = 4


def test_hash_chain_names_the_whole_prefix_and_only_full_blocks():
    a = chain_hashes(list(range(10)), BS)
    assert len(a) == 2  # 10 tokens: 2 full blocks, the partial third has no hash
    b = chain_hashes([99] + list(range(1, 10)), BS)
    # block 1 has the same tokens in both, but its parent differs: the hash differs
    assert a[0] != b[0] and a[1] != b[1]
    assert chain_hashes(list(range(8)) + [5, 5, 5, 5], BS)[:2] == a
    assert chain_hashes(list(range(12)), BS, limit=1) == a[:1]
    grown = extend_chain(list(a[:1]), list(range(4, 12)), BS)  # incremental = all at once
    assert grown == chain_hashes(list(range(12)), BS)


def _seq(pool: PrefixCachingBlockManager, sid: str, tokens: list[int]) -> list[bytes]:
    """Allocate ``tokens`` reusing the cached prefix, 'compute' them and commit."""
    hashes = chain_hashes(tokens, BS)
    prefix = pool.match(hashes, (len(tokens) - 1) // BS)
    pool.allocate(sid, 0, prefix)
    pool.append_slots(sid, len(tokens) - len(prefix) * BS)
    pool.commit(sid, hashes, len(tokens))
    return hashes


def test_shared_blocks_are_refcounted_and_stay_cached_after_free():
    pool = PrefixCachingBlockManager(8, BS)
    tokens = list(range(10))                        # 2 full blocks + 2 tokens
    h = _seq(pool, "a", tokens)
    first = pool.block_table("a")
    assert pool.num_cached_blocks == 2             # the partial third block is not cached
    assert pool.match(h, 10) == first[:2]
    _seq(pool, "b", tokens)
    shared = pool.block_table("b")
    assert shared[:2] == first[:2] and shared[2] != first[2]  # partial block never shared
    assert [pool.ref_count(b) for b in first[:2]] == [2, 2]
    assert pool.seq_len("b") == 10
    pool.free("a")
    assert [pool.ref_count(b) for b in first[:2]] == [1, 1]
    pool.free("b")
    assert pool.num_free_blocks == 8 and pool.usage == 0.0  # cached blocks count as free
    assert pool.match(h, 10) == first[:2]          # ... and are still there


def test_full_prompt_cached_still_computes_its_last_token():
    pool = PrefixCachingBlockManager(8, BS)
    tokens = list(range(8))                         # exactly 2 full blocks
    h = _seq(pool, "a", tokens)
    assert pool.match(h, (len(tokens) - 1) // BS) == pool.block_table("a")[:1]


def test_lru_eviction_only_when_free_list_is_dry_and_never_a_block_in_use():
    pool = PrefixCachingBlockManager(4, BS)
    old = _seq(pool, "old", [1] * 4 + [2] * 4)     # 2 cached blocks
    pool.free("old")
    new = _seq(pool, "new", [3] * 4 + [4] * 4)     # takes the 2 free blocks, no eviction
    assert pool.evictions == 0 and pool.match(old, 2) != []
    pool.free("new")
    # "old" was freed first: least recently used, evicted first (its tail block first)
    live = pool.allocate("live", 0, pool.match(new, 1))   # holds new's first block
    pool.append_slots("live", 4)                    # 1 more block: evicts from "old"
    assert pool.evictions == 1
    assert pool.match(old, 2) == pool.match(old, 1) and len(pool.match(old, 1)) == 1
    pool.append_slots("live", 4)                    # another: old's first block goes
    assert pool.match(old, 2) == [] and pool.evictions == 2
    pool.append_slots("live", 4)                    # new's tail (ref 0) goes, never live[0]
    assert pool.match(new, 2) == [live[0]] and pool.ref_count(live[0]) == 1
    with pytest.raises(KVCacheFull):
        pool.append_slots("live", 4)                # nothing evictable: the pool is full
    assert not pool.try_append("live", 4)


def test_freed_tail_blocks_are_evicted_before_their_prefix():
    pool = PrefixCachingBlockManager(3, BS)
    h = _seq(pool, "a", list(range(12)))            # 3 full blocks
    pool.free("a")
    pool.allocate("x", 4)                           # one block: evicts a's last one
    assert pool.match(h, 3) == pool.match(h, 2) and len(pool.match(h, 3)) == 2


def test_can_allocate_counts_reviving_an_evictable_prefix_block():
    pool = PrefixCachingBlockManager(2, BS)
    h = _seq(pool, "a", list(range(5)))            # 1 cached block + 1 partial
    pool.free("a")
    prefix = pool.match(h, 1)
    assert pool.can_allocate(8, prefix)             # prefix block + 1 new = the 2 free
    assert not pool.can_allocate(12, prefix)


def _req(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, list(prompt), SamplingParams(temperature=0, max_tokens=max_tokens),
                   arrival=0.0)


def test_batcher_skips_the_cached_prefix_and_counts_hits():
    s = Batcher(PrefixCachingBlockManager(16, BS), BatchingConfig(max_batch_tokens=64))
    prompt = list(range(1, 12))                     # 11 tokens: 2 full blocks
    a = _req("a", prompt)
    s.add(a)
    plan = s.schedule()
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(0, 11)]
    a.output.append(7)
    s.finish(a, FinishReason.LENGTH)                # its computed blocks are committed
    b = _req("b", prompt + [50, 51])
    s.add(b)
    plan = s.schedule()
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(8, 5)]  # prefill after 2 blocks
    assert b.status is Status.RUNNING
    assert (s.prefix.queries, s.prefix.hits) == (11 + 13, 8)


def test_batcher_error_finish_shares_nothing():
    s = Batcher(PrefixCachingBlockManager(16, BS), BatchingConfig(max_batch_tokens=64))
    a = _req("a", list(range(1, 12)))
    s.add(a)
    s.schedule()
    s.finish(a, FinishReason.ERROR)                 # its step may not have written every layer
    assert s.prefix.num_cached_blocks == 0


def test_batcher_commits_decoded_blocks_at_the_next_step():
    s = Batcher(PrefixCachingBlockManager(16, BS), BatchingConfig(max_batch_tokens=64))
    a = _req("a", list(range(1, 4)), max_tokens=8)  # 3 prompt tokens
    s.add(a)
    s.schedule()
    assert s.prefix.num_cached_blocks == 0
    for tok in (9, 9, 9):
        a.output.append(tok)
        s.schedule()
    # tokens 0..4 computed when the 3rd decode step is planned: block 0 is full and cached
    assert s.prefix.num_cached_blocks == 1
    assert s.prefix.match(chain_hashes([1, 2, 3, 9], BS), 1) == s.blocks.block_table("a")[:1]


def _attention_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_the_flag_defaults_on_and_takes_the_environment(monkeypatch):
    base = ["--model", "m", "--expert-nodes", "e:1"]
    assert _attention_flags().parse_args(base).enable_prefix_caching is True
    off = _attention_flags().parse_args([*base, "--no-enable-prefix-caching"])
    assert off.enable_prefix_caching is False
    monkeypatch.setenv("MEGASCALE_ENABLE_PREFIX_CACHING", "false")
    assert _attention_flags().parse_args(base).enable_prefix_caching is False
    on = _attention_flags().parse_args([*base, "--enable-prefix-caching"])
    assert on.enable_prefix_caching is True  # the command line wins
    monkeypatch.setenv("MEGASCALE_ENABLE_PREFIX_CACHING", "maybe")
    with pytest.raises(ConfigError, match="--enable-prefix-caching"):
        _attention_flags()


def test_a_request_waits_for_the_prompt_blocks_another_is_computing():
    """``n`` siblings (and a burst with one system prompt) prefill the shared full blocks
    once: the later ones wait one step, then take them from the cache."""
    s = Batcher(PrefixCachingBlockManager(32, BS), BatchingConfig(max_batch_tokens=64))
    prompt = list(range(1, 12))                     # 11 tokens: 2 full blocks + 3
    a, b, c = _req("a", prompt), _req("b", prompt), _req("c", [99] + prompt)
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    # b shares a's blocks, so it waits; c (another prefix) is admitted past it
    assert [(x.request.request_id, x.start, x.num_tokens) for x in plan.chunks] == [
        ("a", 0, 11), ("c", 0, 12)]
    assert list(s.waiting) == [b] and s.deferred_admissions == 1
    a.output.append(5)
    c.output.append(5)
    plan = s.schedule()                              # a's prefill is over: its blocks cached
    assert [(x.request.request_id, x.start, x.num_tokens) for x in plan.chunks] == [
        ("a", 11, 1), ("c", 12, 1), ("b", 8, 3)]
    assert s.blocks.block_table("b")[:2] == s.blocks.block_table("a")[:2]
    assert s.prefix.hits == 8
    assert not s._computing  # a's and c's claims went with their commits; b has none


def test_a_waiting_request_is_admitted_when_the_computing_one_leaves():
    """Its claims go with a request that is preempted, aborted or fails mid-prefill: the
    waiting one then computes the blocks itself (nothing waits forever)."""
    for reason in (FinishReason.ABORT, FinishReason.ERROR):
        s = Batcher(PrefixCachingBlockManager(32, BS), BatchingConfig(max_batch_tokens=4))
        prompt = list(range(1, 14))                 # 13 tokens, prefilled 4 per step
        a, b = _req("a", prompt), _req("b", prompt)
        s.add(a)
        s.add(b)
        assert [x.request.request_id for x in s.schedule().chunks] == ["a"]
        s.finish(a, reason)
        plan = s.schedule()
        assert [(x.request.request_id, x.start) for x in plan.chunks] == [
            ("b", 4 if reason is FinishReason.ABORT else 0)]  # an abort's block is shared
        assert s._computing and all(r is b for r in s._computing.values())
    s = Batcher(PrefixCachingBlockManager(32, BS), BatchingConfig(max_batch_tokens=4))
    a, b = _req("a", list(range(1, 14))), _req("b", list(range(1, 14)))
    s.add(a)
    s.add(b)
    s.schedule()
    s.requeue(a)                                     # preempted: back at the head
    assert [x.request.request_id for x in s.schedule().chunks] == ["a"]
    assert a.num_computed == 8 and b.status is Status.WAITING  # a resumes after its block
