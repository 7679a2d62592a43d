"""The expert node's drain loop in-process, over real libm2n links (services/expert/worker.py).

A round of several dispatches runs one forward per layer and answers each sender with exactly
its rows' partial; a lone dispatch is computed straight from its slot, which must come back
to the sender after the reply; the per-expert counts, deferred while dispatches queue, are
exact once the node is idle.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch

import libm2n
from services.core import moe_wire
from services.core.model import ExpertSide
from services.expert.worker import ExpertWorker

HOSTED = [0, 1, 2, 3]
H, K = 64, 2  # the engine tests' mixtral checkpoint


@pytest.fixture(params=["tcp", "shm"])
def node(request, engine_ckpt):
    """(worker, dispatch senders by id, reply receivers by id) with 2-slot pools both ways,
    over each transport the engine runs on."""
    experts = ExpertSide.from_pretrained(engine_ckpt("mixtral"), HOSTED)
    tag = f"worker-{uuid.uuid4().hex[:12]}"

    def url(name: str) -> str:
        return "tcp://127.0.0.1:0" if request.param == "tcp" else f"shm://{tag}-{name}"

    two = libm2n.ReceiverConfig(slots_per_sender=2)
    rx = libm2n.open_receiver(url("d"), two)
    worker = ExpertWorker(experts, rx, m2n_sender_id=9)
    replies = {sid: libm2n.open_receiver(url(f"r{sid}"), two) for sid in (1, 2)}
    for sid, reply_rx in replies.items():
        worker.attach(sid, reply_rx.url)
    senders = {sid: libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=sid)) for sid in (1, 2)}
    yield worker, senders, replies
    for s in senders.values():
        s.close()
    worker.close()
    for r in replies.values():
        r.close()
    rx.close()


def dispatch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, H, generator=g)
    ids = torch.randint(0, len(HOSTED), (n, K), generator=g)
    ids[0, 1] = -1  # a pair served elsewhere contributes nothing here
    return rows, ids, torch.rand(n, K, generator=g)


def test_a_round_of_several_dispatches_answers_each_sender(node, engine_ckpt):
    worker, senders, replies = node
    sent = [(1, 0, dispatch(5, 1)), (2, 0, dispatch(3, 2)), (1, 2, dispatch(4, 3))]
    for tag, (sid, layer, (rows, ids, w)) in enumerate(sent):
        senders[sid].send(moe_wire.pack_dispatch(rows, ids, w), layer=layer,
                          tag=tag).result(timeout=10)
    msgs = [worker.rx.recv(timeout=10) for _ in sent]
    worker.process(msgs)  # one round: layer 0 gets one forward over both senders' rows
    ref = ExpertSide.from_pretrained(engine_ckpt("mixtral"), HOSTED)
    for tag, (sid, layer, (rows, ids, w)) in enumerate(sent):
        with replies[sid].recv(timeout=10) as msg:  # each sender's replies in its order
            assert msg.header.tag == tag
            got = msg.tensor().clone()
        torch.testing.assert_close(got, ref.forward(layer, rows, ids, w), rtol=0, atol=1e-5)


def test_lone_dispatches_return_their_slots_and_counts_settle_when_idle(node, engine_ckpt):
    worker, senders, replies = node
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    ref = ExpertSide.from_pretrained(engine_ckpt("mixtral"), HOSTED)
    want_rows = [0] * 8
    try:
        # 6 round trips through a 2-slot pool: each lone dispatch's slot (computed in place)
        # must come back, or the third send would wait for a credit and time out.
        for tag in range(6):
            rows, ids, w = dispatch(4 + tag, 10 + tag)
            for e in ids[ids >= 0].tolist():
                want_rows[e] += 1
            senders[1].send(moe_wire.pack_dispatch(rows, ids, w), layer=tag % 3,
                            tag=tag).result(timeout=5)
            with replies[1].recv(timeout=10) as msg:
                assert msg.header.tag == tag
                torch.testing.assert_close(msg.tensor().clone(),
                                           ref.forward(tag % 3, rows, ids, w), rtol=0, atol=1e-5)
        deadline = time.monotonic() + 10
        while worker.stats.messages < 6 or sum(worker.stats.rows_by_expert.values()) < sum(
                want_rows):
            assert time.monotonic() < deadline, "the node's counts never settled"
            time.sleep(0.01)
        assert [worker.stats.rows_by_expert.get(e, 0) for e in range(8)] == want_rows
        assert worker.stats.compute_s > 0
    finally:
        stop.set()
        thread.join(timeout=10)


def test_a_failed_compute_answers_its_senders_with_an_error_and_the_node_goes_on(node,
                                                                                  engine_ckpt):
    """Layer 0's expert weights go missing after load (an injected fault): its dispatch is
    answered with an error at once, the other layer's in the same round as usual, and the
    slots come back."""
    worker, senders, replies = node
    del worker.experts.gate_up_t[0]
    ref = ExpertSide.from_pretrained(engine_ckpt("mixtral"), HOSTED)
    for rnd in range(2):  # 2 rounds x 2 dispatches through a 2-slot pool: slots must return
        sent = [(0, dispatch(3, 20 + rnd)), (2, dispatch(4, 30 + rnd))]
        for layer, (rows, ids, w) in sent:
            senders[1].send(moe_wire.pack_dispatch(rows, ids, w), layer=layer,
                            tag=layer).result(timeout=10)
        worker.process([worker.rx.recv(timeout=10) for _ in sent])
        with replies[1].recv(timeout=10) as msg:
            assert msg.header.tag == 0 and moe_wire.is_error(msg.tensor())
            assert "expert compute failed on layer 0" in moe_wire.error_text(msg.tensor())
        rows, ids, w = sent[1][1]
        with replies[1].recv(timeout=10) as msg:
            assert msg.header.tag == 2
            torch.testing.assert_close(msg.tensor().clone(), ref.forward(2, rows, ids, w),
                                       rtol=0, atol=1e-5)
    assert worker.stats.refused == 2


def test_replies_wait_for_a_replica_that_holds_every_reply_slot(node, engine_ckpt):
    """The replica keeps both reply slots: the third reply is queued (the node goes on), then
    written when a slot comes back."""
    worker, senders, replies = node
    ref = ExpertSide.from_pretrained(engine_ckpt("mixtral"), HOSTED)
    sent = [dispatch(3 + tag, 40 + tag) for tag in range(3)]
    held = []
    for tag, (rows, ids, w) in enumerate(sent):
        senders[1].send(moe_wire.pack_dispatch(rows, ids, w), layer=2, tag=tag).result(
            timeout=10)
        worker.process([worker.rx.recv(timeout=10)])
        if tag < 2:
            held.append(replies[1].recv(timeout=10))
    with pytest.raises(TimeoutError):
        replies[1].recv(timeout=0.2)  # the third reply has no slot yet
    got = []
    for msg in held:
        with msg:
            got.append((msg.header.tag, msg.tensor().clone()))
    with replies[1].recv(timeout=10) as msg:
        got.append((msg.header.tag, msg.tensor().clone()))
    for tag, ((got_tag, out), (rows, ids, w)) in enumerate(zip(got, sent, strict=True)):
        assert got_tag == tag
        torch.testing.assert_close(out, ref.forward(2, rows, ids, w), rtol=0, atol=1e-5)
