"""The engine's deferred event delivery, driven turn by turn in-process against a real expert
node process (services/attention/engine.py: "Deferred delivery").

Events wait in an outbox until the engine blocks on a combine, at the latest one turn of the
lanes later; a handler thread that finishes a request delivers at once. Whatever the path, a
request's events must arrive in order, none lost, the finishing one last.
"""

from __future__ import annotations

import asyncio

import pytest

import libm2n
from services.attention.config import AttentionConfig
from services.attention.dispatch import ExpertClient
from services.attention.engine import Engine, TokenEvent
from services.attention.placement import ExpertAttacher, attach_experts
from services.core.model import AttentionSide
from services.core.request import SamplingParams

PROMPTS = [[5, 17, 42, 8, 99], [7, 3, 250, 11]]
MAX_TICKS = 500  # bounds every drive loop below (a few dozen turns are needed)


@pytest.fixture(scope="module")
def expert(lone_expert):
    return lone_expert("0-7", "delivery-expert")


@pytest.fixture
def engine(engine_ckpt, expert):
    path = engine_ckpt("mixtral")
    config = AttentionConfig(model_dir=path, expert_nodes=(expert.grpc,), micro_batches=2,
                             stream_interval=1, block_size=4, num_blocks=64)
    attention = AttentionSide.from_pretrained(path)
    cfg = attention.cfg
    reply_rx = libm2n.open_receiver("tcp://127.0.0.1:0")
    placement = asyncio.run(attach_experts(
        config, ExpertAttacher("delivery-test", 0, reply_rx.url, cfg.num_experts)))
    client = ExpertClient(placement, reply_rx, 0, cfg.hidden_size, cfg.top_k)
    yield Engine(attention, client, config)
    client.close()
    reply_rx.close()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def check_stream(events: list[TokenEvent], reason: str) -> list[int]:
    """Contiguous indices, one final event and it comes last; returns the tokens."""
    tokens: list[int] = []
    for ev in events:
        assert ev.index == len(tokens), [(e.index, e.token_ids) for e in events]
        tokens += ev.token_ids
    assert [ev.finish_reason for ev in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == reason
    return tokens


def drive(engine: Engine, until) -> int:  # noqa: ANN001 - predicate
    for turn in range(MAX_TICKS):
        if until():
            return turn
        engine.tick()
    raise AssertionError("the engine did not get there within the turn bound")


def test_deferred_events_arrive_in_order_with_exact_tokens(engine, engine_ckpt, hf_greedy):
    got: dict[str, list[TokenEvent]] = {"a": [], "b": []}
    for rid, prompt in zip(got, PROMPTS, strict=True):
        engine.submit(rid, prompt, greedy(12), got[rid].append)
    drive(engine, lambda: all(ev and ev[-1].finish_reason for ev in got.values()))
    engine.tick()  # nothing left to run: an idle turn delivers whatever was deferred
    assert not engine._outbox
    want = hf_greedy(engine_ckpt("mixtral"), PROMPTS, 12)
    assert [check_stream(got[r], "length") for r in got] == want


def test_events_sampled_in_a_turn_are_delivered_within_two_more(engine):
    got: list[TokenEvent] = []
    engine.submit("r", PROMPTS[0], greedy(40), got.append)
    req = engine.batcher.get("r")
    # a turn that samples leaves the token in the outbox unless a combine wait flushed it
    drive(engine, lambda: len(req.output) >= 3)
    sampled = len(req.output)
    engine.tick()
    engine.tick()  # what was pending at the start of this turn is out by its end
    delivered = sum(len(ev.token_ids) for ev in got)
    assert delivered >= sampled
    engine.abort("r")
    drive(engine, lambda: got and got[-1].finish_reason)
    check_stream(got, "abort")


def test_a_handler_abort_never_overtakes_deferred_events(engine):
    """Tokens still in the outbox when a handler thread finishes requests: they are delivered
    first, in order, and the final events last."""
    running: list[TokenEvent] = []
    waiting: list[TokenEvent] = []
    engine.submit("run", PROMPTS[0], greedy(40), running.append)
    req = engine.batcher.get("run")
    for _ in range(MAX_TICKS):
        engine.tick()
        if len(req.output) >= 2 and engine._outbox:
            break
    else:
        raise AssertionError("no turn left a token in the outbox")
    pending = [ev for _, ev in engine._outbox]
    # a request that never ran is aborted by the handler thread: delivered at once, and the
    # running request's deferred events go out with it, ahead of it
    engine.submit("wait", PROMPTS[1], greedy(4), waiting.append)
    assert engine.abort("wait")
    assert waiting and waiting[-1].finish_reason == "abort" and not engine._outbox
    assert running[-len(pending):] == pending
    # the running one is finished by the engine at its lane boundary, after its tokens
    assert engine.abort("run")
    drive(engine, lambda: running and running[-1].finish_reason)
    engine.tick()
    check_stream(running, "abort")
    assert len(check_stream(waiting, "abort")) == 0
