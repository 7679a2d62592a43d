"""shm and tcp transports with real processes: round trips, M x N, back-pressure, tensors."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from m2n_peer import listen_url, pattern

import libm2n

torch.set_num_threads(1)

SIZES = [2 << 10, 16 << 10, 256 << 10, 1 << 20, 8 << 20]


def test_byte_exact_round_trip_2k_to_8m(transport, shm_name, peers):
    rx = libm2n.open_receiver(listen_url(transport, shm_name + "-r"),
                              libm2n.ReceiverConfig(slot_bytes=8 << 20))
    try:
        echo = peers(["echo", listen_url(transport, shm_name + "-e"), rx.url, "1"])
        with libm2n.connect(echo.url, libm2n.SenderConfig(sender_id=0)) as tx:
            for i, size in enumerate(SIZES):
                data = pattern(0, i, size)
                tx.send(data, tag=i, step=3, layer=5, micro_batch=1).result(timeout=30)
                with rx.recv(timeout=30) as msg:
                    assert msg.header.tag == i and msg.sender_id == 1
                    assert msg.header.payload_bytes == size
                    assert np.array_equal(np.frombuffer(msg.payload, np.uint8), data)
    finally:
        rx.close()


def test_tensor_views_and_header_fields(transport, shm_name):
    rx = libm2n.open_receiver(listen_url(transport, shm_name), libm2n.ReceiverConfig())
    try:
        with libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=9, epoch=4)) as tx:
            trace, span = bytes(range(16)), bytes(range(8))
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
                t = (torch.randn(3, 5, 7) * 10).to(dtype)
                tx.send(t, step=11, layer=2, micro_batch=1, tag=77, trace_id=trace,
                        span_id=span).result(timeout=10)
                with rx.recv(timeout=10) as msg:
                    h = msg.header
                    assert (h.step, h.layer, h.micro_batch, h.tag, h.epoch) == (11, 2, 1, 77, 4)
                    assert (h.trace_id, h.span_id) == (trace, span)
                    got = msg.tensor()
                    assert got.dtype == dtype and got.shape == (15, 7)
                    assert torch.equal(got, t.reshape(15, 7))
            # Zero copy out: the tensor aliases slot memory, not a private copy.
            tx.send(torch.arange(4, dtype=torch.float32)).result(timeout=10)
            msg = rx.recv(timeout=10)
            a, b = msg.tensor(), msg.tensor()
            a[0, 0] = 42.0
            assert b[0, 0].item() == 42.0
            msg.release()
            msg.release()  # idempotent
            # Too big for a slot: a clear error, nothing sent.
            with pytest.raises(libm2n.InvalidArgument, match="exceeds the slot size"):
                tx.send(bytes(rx.config.slot_bytes + 1))
    finally:
        rx.close()


def test_m_by_n_fan_out_fan_in_keeps_per_pair_order(transport, shm_name, peers):
    count, size = 40, 24 << 10
    sinks = [peers(["sink", listen_url(transport, f"{shm_name}-{j}"), str(3 * count), "2"])
             for j in range(3)]
    urls = [s.url for s in sinks]
    sources = [peers(["source", str(i), str(count), str(size), *urls]) for i in range(3)]
    for s in sources:
        assert s.result()["sent"] == 3 * count
    for s in sinks:
        r = s.result()
        assert r == {"received": 3 * count, "bad": 0, "out_of_order": 0,
                     "per_sender": {"0": count, "1": count, "2": count}}


def test_back_pressure_slow_receiver_makes_sender_wait(transport, shm_name, peers):
    rx = libm2n.open_receiver(listen_url(transport, shm_name),
                              libm2n.ReceiverConfig(slots_per_sender=2, slot_bytes=64 << 10))
    try:
        count = 30
        src = peers(["source", "4", str(count), str(32 << 10), rx.url])
        held = [rx.recv(timeout=30), rx.recv(timeout=30)]
        # Two slots, both held: the sender cannot write a third message.
        time.sleep(0.3)
        assert rx.poll() is None
        assert rx.stats()["messages"] == 2
        for m in held:
            m.release()
        tags = [h.header.tag for h in held]
        for _ in range(count - 2):
            with rx.recv(timeout=30) as msg:
                data = np.frombuffer(msg.payload, np.uint8)
                assert np.array_equal(data, pattern(4, msg.header.tag, 32 << 10))
                tags.append(msg.header.tag)
            time.sleep(0.005)  # a slow receiver
        assert tags == list(range(count))
        res = src.result()
        assert res["sent"] == count and res["queued"] > 0
        assert rx.stats()["errors"] == 0
    finally:
        rx.close()


def test_many_senders_to_one_receiver_in_process(transport, shm_name):
    rx = libm2n.open_receiver(listen_url(transport, shm_name), libm2n.ReceiverConfig())
    try:
        txs = [libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=i)) for i in range(4)]
        with pytest.raises(libm2n.PeerLost, match="sender id 2 is already connected"):
            libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=2))
        for r in range(3):
            for i, tx in enumerate(txs):
                tx.send(pattern(i, r, 100), tag=r)
        seen = {}
        for _ in range(12):
            with rx.recv(timeout=10) as m:
                seen.setdefault(m.sender_id, []).append(m.header.tag)
        assert seen == {i: [0, 1, 2] for i in range(4)}
        assert sorted(rx.peers()) == [0, 1, 2, 3]
        for tx in txs:
            tx.close()
        deadline = time.monotonic() + 5
        while rx.peers() and time.monotonic() < deadline:
            assert rx.poll() is None  # connection events are processed by recv/poll
            time.sleep(0.01)
        assert rx.peers() == [] and rx.stats()["peers_closed"] >= 4
    finally:
        rx.close()


def test_no_shm_segment_left_behind(shm_name, peers):
    before = {n for n in os.listdir("/dev/shm") if n.startswith("m2n-")}
    rx = libm2n.open_receiver(f"shm://{shm_name}", libm2n.ReceiverConfig(slot_bytes=1 << 16))
    src = peers(["source", "1", "5", "1000", rx.url])
    for _ in range(5):
        rx.recv(timeout=10).release()
    src.result()
    rx.close()
    after = {n for n in os.listdir("/dev/shm") if n.startswith("m2n-")}
    assert after <= before


def test_cleanup_stale_segments(tmp_path):
    dead = tmp_path / "m2n-999999999-x"
    live = tmp_path / f"m2n-{os.getpid()}-y"
    other = tmp_path / "other-1-z"
    for p in (dead, live, other):
        p.write_bytes(b"x")
    removed = libm2n.cleanup_stale_segments("m2n-", str(tmp_path))
    assert removed == [str(dead)]
    assert live.exists() and other.exists() and not dead.exists()


def test_connect_to_nothing_fails_within_bound():
    t0 = time.monotonic()
    with pytest.raises(libm2n.PeerLost, match="cannot connect to shm://nobody-here"):
        libm2n.connect("shm://nobody-here", libm2n.SenderConfig(sender_id=1, connect_timeout_s=0.3))
    assert time.monotonic() - t0 < 10  # bounded, generously


def test_spinning_receiver_delivers_and_then_sleeps(transport, shm_name):
    """spin_us: a bounded busy poll before blocking; a waiting receiver must still sleep."""
    rx = libm2n.open_receiver(listen_url(transport, shm_name),
                              libm2n.ReceiverConfig(spin_us=2000.0))
    try:
        with libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=1)) as tx:
            for i in range(20):
                tx.send(pattern(1, i, 300), tag=i)
                with rx.recv(timeout=10) as msg:
                    assert msg.header.tag == i
                    assert np.array_equal(np.frombuffer(msg.payload, np.uint8),
                                          pattern(1, i, 300))
            cpu0 = time.process_time()
            with pytest.raises(TimeoutError):
                rx.recv(timeout=1.0)
            # A spin that never ended would burn ~1 s of CPU here; the bound is generous.
            assert time.process_time() - cpu0 < 0.5
    finally:
        rx.close()


def test_credits_are_read_lazily_but_outstanding_is_exact(transport, shm_name):
    """Credits are drained inline by the next call, so counters are exact without a thread."""
    rx = libm2n.open_receiver(listen_url(transport, shm_name),
                              libm2n.ReceiverConfig(slots_per_sender=3, slot_bytes=1024))
    try:
        with libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=1)) as tx:
            for _ in range(5):
                for i in range(3):
                    tx.send(pattern(1, i, 100), tag=i)
                assert tx.outstanding() == 3
                queued = tx.send(pattern(1, 3, 100), tag=3)
                assert not queued.done() and tx.outstanding() == 4
                msgs = [rx.recv(timeout=10) for _ in range(3)]
                for m in msgs:
                    m.release()
                queued.result(timeout=10)  # the reader thread wrote it once a credit came
                with rx.recv(timeout=10) as m:
                    assert m.header.tag == 3
                deadline = time.monotonic() + 10
                while tx.outstanding() and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert tx.outstanding() == 0
            assert tx.stats()["queued"] == 5
    finally:
        rx.close()
