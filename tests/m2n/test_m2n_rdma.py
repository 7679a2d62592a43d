"""rdma transport: clear unavailability without a device; the device-independent parts (the
immediate, the QP info exchange, slot layout) and the whole data path run over the in-process
queue pair of ``loopback_verbs.py`` (the real RdmaReceiver/RdmaSender code, credits included)."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from loopback_verbs import LoopbackQP

import libm2n
from libm2n import rdma
from libm2n.base import parse_url
from libm2n.header import HEADER_SIZE

torch.set_num_threads(1)


def _rdma_reason() -> str | None:
    try:
        rdma.list_devices()
    except libm2n.TransportUnavailable as exc:
        return str(exc)
    return None


REASON = _rdma_reason()


def test_pyverbs_loads_from_the_system_copy():
    try:
        mod = rdma.load_pyverbs()
    except libm2n.TransportUnavailable as exc:
        pytest.skip(str(exc))
    assert mod.__name__ == "pyverbs"


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_real_device_round_trip_byte_exact():
    """On a machine with an RDMA NIC: a real RC queue pair, WRITE_WITH_IMM into the slot."""
    rx = libm2n.open_receiver("rdma://127.0.0.1:0", libm2n.ReceiverConfig(slot_bytes=1 << 20))
    tx = libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=1))
    try:
        for size in (2048, 256 << 10, 1 << 20):
            data = bytes(range(256)) * (size // 256)
            tx.send(data).result(timeout=10)
            with rx.recv(timeout=10) as msg:
                assert bytes(msg.payload) == data
    finally:
        tx.close()
        rx.close()


@pytest.mark.skipif(REASON is None, reason="this machine has an RDMA device")
def test_no_device_is_a_clear_error():
    assert REASON.startswith("rdma: ")
    for call in (lambda: libm2n.open_receiver("rdma://127.0.0.1:0"),
                 lambda: libm2n.connect("rdma://127.0.0.1:7471",
                                        libm2n.SenderConfig(sender_id=1))):
        with pytest.raises(libm2n.TransportUnavailable, match=r"^rdma: "):
            call()


@given(st.integers(0, rdma.MAX_IMM_SLOTS - 1), st.integers(0, 2**64 - 1))
def test_immediate_round_trip(slot, seq):
    imm = rdma.pack_imm(slot, seq)
    assert 0 <= imm < 2**32
    assert rdma.unpack_imm(imm) == (slot, seq & rdma.IMM_SEQ_MASK)


def test_immediate_bounds():
    with pytest.raises(libm2n.ProtocolError, match="does not fit"):
        rdma.pack_imm(rdma.MAX_IMM_SLOTS, 0)
    with pytest.raises(libm2n.ProtocolError, match="32-bit"):
        rdma.unpack_imm(2**32)
    # ReceiverConfig's slot limit fits the immediate's slot bits.
    assert libm2n.ReceiverConfig(slots_per_sender=rdma.MAX_IMM_SLOTS).slots_per_sender == 4096


def test_slot_layout():
    assert rdma.slot_offset(0, 1000) == 0
    assert rdma.slot_offset(3, 1000) == 3 * (HEADER_SIZE + 1000)


GOOD_INFO = {"qpn": 17, "psn": 99, "gid": "fe80::1", "lid": 3, "rkey": 2**32 - 1,
             "addr": 2**47, "size": 4096}


def test_info_encoding_round_trip():
    line = rdma.encode_info(GOOD_INFO)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert rdma.decode_info(line) == GOOD_INFO


@pytest.mark.parametrize("field, value, message", [
    ("qpn", -1, "'qpn' must be an int"), ("psn", 2**24, "'psn'"), ("rkey", "7", "'rkey'"),
    ("addr", True, "'addr'"), ("size", None, "'size'"), ("gid", 5, "'gid' must be a string"),
])
def test_info_bad_field_is_named(field, value, message):
    with pytest.raises(libm2n.ProtocolError, match=message):
        rdma.decode_info(rdma.encode_info({**GOOD_INFO, field: value}))


def test_info_garbage():
    for line in (b"not json\n", b"[1, 2]\n", b"\xff\xfe\n"):
        with pytest.raises(libm2n.ProtocolError, match="not a JSON object"):
            rdma.decode_info(line)


def test_info_exchange_over_a_socket():
    a, b = socket.socketpair()
    mine, theirs = dict(GOOD_INFO, qpn=1), dict(GOOD_INFO, qpn=2)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", rdma.exchange_info(b, theirs)))
    t.start()
    assert rdma.exchange_info(a, mine) == theirs
    t.join(5)
    assert out["b"] == mine
    b.close()
    with pytest.raises(libm2n.PeerLost, match="side channel"):
        rdma.exchange_info(a, mine)
    a.close()


# -- the data path over the loopback queue pair ----------------------------------------------
def _pair(slots: int = 4, slot_bytes: int = 1 << 16, **tx_kw):
    rx = rdma.RdmaReceiver(parse_url("rdma://127.0.0.1:0"),
                           libm2n.ReceiverConfig(slots_per_sender=slots, slot_bytes=slot_bytes),
                           qp_factory=LoopbackQP)
    tx = rdma.RdmaSender(parse_url(rx.url), libm2n.SenderConfig(sender_id=5, **tx_kw),
                         qp_factory=LoopbackQP)
    return rx, tx


def test_loopback_round_trip_tensors_and_header():
    rx, tx = _pair()
    try:
        assert rx.url.startswith("rdma://127.0.0.1:") and tx.nslots == 4
        for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.int64)):
            t = (torch.randn(6, 9) * 10).to(dtype)
            tx.send(t, step=4, layer=i, micro_batch=1, tag=100 + i).result(timeout=5)
            with rx.recv(timeout=5) as msg:
                h = msg.header
                assert (h.sender_id, h.step, h.layer, h.tag, h.seq) == (5, 4, i, 100 + i, i)
                assert torch.equal(msg.tensor(), t)
        data = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
        tx.send(data).result(timeout=5)  # a payload that fills the slot exactly
        with rx.recv(timeout=5) as msg:
            assert np.array_equal(msg.numpy().reshape(-1), data)
        assert rx.stats()["messages"] == 4 and tx.stats()["messages"] == 4
    finally:
        tx.close()
        rx.close()


def test_loopback_credits_back_pressure_and_order():
    rx, tx = _pair(slots=2, slot_bytes=256)
    try:
        tx.send(b"a").result(timeout=5)
        tx.send(b"b").result(timeout=5)
        third = tx.send(b"c")  # both slots held by the receiver: no credit
        assert not third.done() and tx.outstanding() == 3
        first = rx.recv(timeout=5)
        second = rx.recv(timeout=5)
        assert (bytes(first.payload), bytes(second.payload)) == (b"a", b"b")
        assert not third.done()
        first.release()  # CREDIT over the side channel -> the queued send is written
        third.result(timeout=5)
        with rx.recv(timeout=5) as msg:
            assert bytes(msg.payload) == b"c" and msg.header.slot == first.header.slot
        second.release()
        for i in range(50):  # slots cycle; sequence numbers keep matching the immediates
            tx.send(bytes([i]) * 7).result(timeout=5)
            with rx.recv(timeout=5) as msg:
                assert bytes(msg.payload) == bytes([i]) * 7 and msg.header.seq == 3 + i
        assert rx.stats()["credits_sent"] == 53
    finally:
        tx.close()
        rx.close()


def test_loopback_header_not_matching_the_immediate_drops_only_that_link():
    rx, tx = _pair(slots=2, slot_bytes=256)
    try:
        tx.send(b"ok").result(timeout=5)
        rx.recv(timeout=5).release()
        qp = tx._qp
        # A write whose immediate names slot 1 while the header in the slot says slot 0.
        header = bytes(tx._mem[:HEADER_SIZE])
        qp.write_imm(0, HEADER_SIZE, rdma.slot_offset(1, 256), rdma.pack_imm(1, 1))
        assert header[:4] == b"M2N1"
        with pytest.raises(TimeoutError):
            rx.recv(timeout=0.5)
        assert rx.stats()["errors"] == 1 and rx.peers() == []
        with pytest.raises(libm2n.ProtocolError, match="names slot 0"):
            for _ in range(200):  # the ERROR frame reaches the sender on its side channel
                tx.check()
                threading.Event().wait(0.01)
    finally:
        tx.close()
        rx.close()


def test_loopback_receiver_close_reaches_the_sender():
    rx, tx = _pair()
    tx.send(b"x").result(timeout=5)
    rx.recv(timeout=5).release()
    rx.close()
    with pytest.raises(libm2n.PeerLost):
        for _ in range(200):
            tx.check()
            threading.Event().wait(0.01)
    tx.close()
