"""Unit tests of the replica's batcher (continuous batching) and its lanes (small factories)."""

from __future__ import annotations

import pytest

from services.attention.batching import (
    Batcher,
    BatchingConfig,
    QueueFull,
    Request,
    Status,
)
from services.core.kv_cache import BlockManager
from services.core.request import SamplingParams
from services.core.sampling import finish_reason
from services.errors import UserError


def make_batcher(num_blocks: int = 64, block_size: int = 4, **cfg) -> Batcher:
    return Batcher(BlockManager(num_blocks, block_size), BatchingConfig(**cfg))


_counter = iter(range(10**6))


def make_request(prompt_len: int = 8, max_tokens: int = 8, rid: str | None = None) -> Request:
    n = next(_counter)
    return Request(rid or f"r{n}", list(range(1, prompt_len + 1)),
                   SamplingParams(temperature=0, max_tokens=max_tokens), arrival=float(n))


def step_and_sample(s: Batcher, token: int = 7, lane: int = 0, lanes: int = 1):
    """Schedule one (lane) step and append a sampled token to every chunk that samples."""
    plan = s.schedule(lane, lanes)
    for c in plan.chunks:
        if c.samples:
            c.request.output.append(token)
    return plan


def test_prefill_then_decode_one_token_each():
    s = make_batcher()
    a, b = make_request(5), make_request(3)
    s.add(a)
    s.add(b)
    plan = step_and_sample(s)
    assert [(c.request, c.start, c.num_tokens) for c in plan.chunks] == [(a, 0, 5), (b, 0, 3)]
    plan = step_and_sample(s)
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(5, 1), (3, 1)]
    assert plan.chunks[0].token_ids == [7]


def test_chunked_prefill_respects_token_budget_and_mixes_with_decode():
    s = make_batcher(max_batch_tokens=6)
    a = make_request(4)
    s.add(a)
    step_and_sample(s)                      # a prefilled (4 tokens)
    b = make_request(10)
    s.add(b)
    plan = step_and_sample(s)               # a decodes 1, b gets a 5-token chunk
    assert [(c.request, c.num_tokens, c.samples) for c in plan.chunks] == [
        (a, 1, True), (b, 5, False)]
    plan = step_and_sample(s)               # b's remaining 5 tokens finish its prefill
    assert [(c.request, c.start, c.num_tokens) for c in plan.chunks] == [(a, 5, 1), (b, 5, 5)]
    assert plan.chunks[1].samples and plan.num_tokens <= 6


def test_admission_waits_for_free_blocks_and_fcfs():
    s = make_batcher(num_blocks=4, block_size=4)   # 16 token slots
    a, b, c = make_request(12, max_tokens=4), make_request(8, max_tokens=4), make_request(2, 2)
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    # b does not fit (needs 2 blocks, 1 free); c would, but FCFS does not skip b
    assert [ch.request for ch in plan.chunks] == [a]
    assert b.status is Status.WAITING and c.status is Status.WAITING
    s.finish(a, "stop")
    assert s.blocks.num_free_blocks == 4
    assert [ch.request for ch in s.schedule().chunks] == [b, c]


def test_preemption_frees_newest_and_recomputes():
    s = make_batcher(num_blocks=3, block_size=4)   # 12 slots
    a, b = make_request(4, max_tokens=8), make_request(4, max_tokens=8)
    s.add(a)
    s.add(b)
    step_and_sample(s)                      # 2 blocks used, a and b each have 5 tokens known
    for _ in range(3):
        step_and_sample(s)                  # both need a second block at token 5 -> one preempted
    assert a.status is Status.RUNNING
    assert b.num_preemptions >= 1
    # b lost its cache and will recompute prompt + output in one chunk when it gets back in
    s.finish(a, "stop")
    plan = s.schedule()
    assert plan.chunks[0].request is b and plan.chunks[0].start == 0
    assert plan.chunks[0].num_tokens == b.num_tokens


def test_finish_frees_blocks_and_abort_of_waiting():
    s = make_batcher(num_blocks=8)
    a, b = make_request(5), make_request(5)
    s.add(a)
    s.add(b)
    s.schedule()
    assert s.blocks.num_free_blocks == 4
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert s.blocks.num_free_blocks == 8 and not s.has_work
    c = make_request(3)
    s.add(c)
    s.finish(c, "abort")                    # still waiting: nothing allocated
    assert s.get(c.request_id) is None


def test_requests_that_can_never_fit_are_refused_clearly():
    s = make_batcher(num_blocks=4, block_size=4, max_model_len=64, max_waiting=1)
    with pytest.raises(UserError, match="KV pool has only 4 blocks"):
        s.add(make_request(10, max_tokens=20))
    with pytest.raises(UserError, match="exceeds the model length 64"):
        s.add(make_request(40, max_tokens=40))
    s.add(make_request(2, rid="x"))
    with pytest.raises(UserError, match="already in use"):
        s.add(make_request(2, rid="x"))
    with pytest.raises(QueueFull):
        s.add(make_request(2))


def test_finish_reason_rules():
    p = SamplingParams(temperature=0, max_tokens=3, stop_token_ids=(9,))
    assert finish_reason(p, [1], eos_ids={2}) is None
    assert finish_reason(p, [1, 2], eos_ids={2}) == "stop"
    assert finish_reason(p, [9], eos_ids={2}) == "stop"
    assert finish_reason(p, [1, 1, 1], eos_ids={2}) == "length"
    ignore = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert finish_reason(ignore, [2], eos_ids={2}) is None


def test_lanes_partition_requests_budget_and_seq_cap():
    s = make_batcher(num_blocks=64, max_batch_tokens=12, max_num_seqs=4)
    reqs = [make_request(3) for _ in range(5)]
    for r in reqs:
        s.add(r)
    lane0 = step_and_sample(s, lane=0, lanes=2)   # half the seqs (2) and half the budget (6)
    lane1 = step_and_sample(s, lane=1, lanes=2)
    assert [c.request for c in lane0.chunks] == reqs[:2]
    assert [c.request for c in lane1.chunks] == reqs[2:4]
    assert [r.lane for r in reqs[:4]] == [0, 0, 1, 1]
    assert reqs[4].status is Status.WAITING       # max_num_seqs (4) is the replica's total
    # a lane's later steps carry only its own requests, one decode token each
    plan = step_and_sample(s, lane=1, lanes=2)
    assert [(c.request, c.num_tokens) for c in plan.chunks] == [(reqs[2], 1), (reqs[3], 1)]
    s.finish(reqs[0], "stop")                     # a seat frees up in lane 0 only
    plan = step_and_sample(s, lane=0, lanes=2)
    assert [c.request for c in plan.chunks] == [reqs[1], reqs[4]] and reqs[4].lane == 0
    with pytest.raises(ValueError, match="lane 2 outside"):
        s.schedule(2, 2)


def test_a_burst_of_arrivals_is_split_evenly_over_the_lanes():
    s = make_batcher(num_blocks=64, max_batch_tokens=256, max_num_seqs=64)
    reqs = [make_request(2) for _ in range(7)]
    for r in reqs:
        s.add(r)
    sizes = [len(step_and_sample(s, lane=lane, lanes=3).chunks) for lane in range(3)]
    assert sizes == [3, 2, 2] and not s.waiting


def test_a_lane_left_larger_hands_its_newest_requests_to_the_smallest():
    s = make_batcher(num_blocks=64, max_batch_tokens=256, max_num_seqs=64)
    reqs = [make_request(2) for _ in range(9)]
    for r in reqs:
        s.add(r)
    for lane in range(3):
        step_and_sample(s, lane=lane, lanes=3)        # 3 per lane: reqs[0:3], [3:6], [6:9]
    for r in reqs[3:5] + reqs[6:8]:
        s.finish(r, "stop")                           # lanes hold 3, 1, 1
    plan = step_and_sample(s, lane=0, lanes=3)
    # lane 0 hands its newest to the smallest lane (3, 1, 1 -> 2, 2, 1), then stops: lanes one
    # request apart are left alone, so requests do not thrash back and forth
    assert [c.request for c in plan.chunks] == reqs[:2] and reqs[2].lane == 1
    # the taker steps it on from where it was: one decode token at its next position
    plan = step_and_sample(s, lane=1, lanes=3)
    assert [(c.request, c.start, c.num_tokens) for c in plan.chunks] == [
        (reqs[2], 2, 1), (reqs[5], 2, 1)]
    plan = step_and_sample(s, lane=2, lanes=3)
    assert [c.request for c in plan.chunks] == [reqs[8]]
    assert [r.lane for r in reqs[:3] + [reqs[5], reqs[8]]] == [0, 0, 1, 1, 2]


def test_preemption_stays_inside_the_lane():
    s = make_batcher(num_blocks=3, block_size=4)    # 12 slots
    a, b = make_request(4, max_tokens=8), make_request(4, max_tokens=8)
    s.add(a)
    step_and_sample(s, lane=0, lanes=2)               # a in lane 0 (1 block)
    s.add(b)
    step_and_sample(s, lane=1, lanes=2)               # b in lane 1 (1 block)
    c = make_request(3, max_tokens=2)
    s.add(c)
    step_and_sample(s, lane=0, lanes=2)               # a decodes into block 2, c waits (0 free)
    assert c.status is Status.WAITING
    # b needs a second block at its 5th token: none is free, and lane 0 may be mid-step, so
    # lane 1 preempts its own newest request (b itself), never a's blocks
    plan = step_and_sample(s, lane=1, lanes=2)
    assert plan.preempted == (b,) and not plan.chunks
    assert a.status is Status.RUNNING and a.num_preemptions == 0
    assert b.status is Status.WAITING and s.waiting[0] is b


