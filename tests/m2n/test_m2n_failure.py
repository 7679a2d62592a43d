"""Peer death (SIGKILL), hung receivers, garbage and bad frames, version mismatch."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from m2n_peer import listen_url

import libm2n
from libm2n import header as hdr


def _recv_frame(sock: socket.socket, timeout: float = 5.0) -> tuple[hdr.Header, bytes]:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < hdr.HEADER_SIZE:
        chunk = sock.recv(hdr.HEADER_SIZE - len(buf))
        assert chunk, "connection closed before a full frame"
        buf += chunk
    h = hdr.unpack(buf)
    body = b""
    while len(body) < (h.payload_bytes if h.kind == hdr.Kind.ERROR else 0):
        chunk = sock.recv(h.payload_bytes - len(body))
        assert chunk
        body += chunk
    return h, body


def _closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_killed_receiver_gives_peer_lost(transport, shm_name, peers):
    sink = peers(["sink", listen_url(transport, shm_name), "1000000"])
    tx = libm2n.connect(sink.url, libm2n.SenderConfig(sender_id=1, peer_timeout_s=2.0))
    try:
        tx.send(b"x" * 100).result(timeout=5)
        sink.kill()
        with pytest.raises(libm2n.PeerLost):
            for _ in range(10000):  # bounded: the first send after the EOF raises
                tx.send(b"y" * 100).result(timeout=5)
                time.sleep(0.001)
        with pytest.raises(libm2n.PeerLost):
            tx.send(b"z")
    finally:
        tx.close()


def test_killed_receiver_fails_pending_sends(transport, shm_name, peers):
    hold = peers(["hold", listen_url(transport, shm_name)])
    tx = libm2n.connect(hold.url, libm2n.SenderConfig(sender_id=1, peer_timeout_s=30.0))
    try:
        for _ in range(2):
            tx.send(b"a" * 10).result(timeout=5)
        pending = tx.send(b"b" * 10)  # no credit: the receiver holds both slots
        assert not pending.done()
        hold.kill()
        with pytest.raises(libm2n.PeerLost):
            pending.result(timeout=10)
    finally:
        tx.close()


def test_hung_receiver_gives_credit_timeout(transport, shm_name, peers):
    hold = peers(["hold", listen_url(transport, shm_name)])
    tx = libm2n.connect(hold.url, libm2n.SenderConfig(sender_id=1, peer_timeout_s=0.3))
    try:
        for _ in range(2):
            tx.send(b"a").result(timeout=5)
        with pytest.raises(libm2n.CreditTimeout, match="no credit from .* within 0.3s"):
            tx.send(b"b").result(timeout=10)
        with pytest.raises(libm2n.PeerLost):
            tx.send(b"c")
    finally:
        tx.close()


def test_killed_sender_does_not_disturb_the_others(transport, shm_name, peers):
    rx = libm2n.open_receiver(listen_url(transport, shm_name), libm2n.ReceiverConfig())
    try:
        a = peers(["stream", "1", rx.url])
        peers(["stream", "2", rx.url])
        seen: set[int] = set()
        assert _wait_for(lambda: _drain(rx, seen) or seen == {1, 2})
        a.kill()
        assert _wait_for(lambda: _drain(rx, set()) or rx.stats()["peers_lost"] == 1)
        assert rx.peers() == [2]
        n0 = rx.stats()["messages"]
        assert _wait_for(lambda: _drain(rx, set()) or rx.stats()["messages"] > n0 + 20)
        assert rx.stats()["errors"] == 0
    finally:
        rx.close()


def _drain(rx: libm2n.Receiver, seen: set[int]) -> None:
    for _ in range(1000):
        m = rx.poll()
        if m is None:
            return
        seen.add(m.sender_id)
        m.release()


class _Pumped:
    """A receiver whose owner thread keeps calling recv (as an engine loop does)."""

    def __init__(self, rx: libm2n.Receiver) -> None:
        self.rx, self.url, self.inbox = rx, rx.url, queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.inbox.put(self.rx.recv(timeout=0.05))
            except TimeoutError:
                pass

    def recv(self, timeout: float) -> libm2n.Message:
        return self.inbox.get(timeout=timeout)

    def stats(self) -> dict[str, int]:
        return self.rx.stats()


@pytest.fixture(scope="module")
def tcp_rx():
    rx = libm2n.open_receiver("tcp://127.0.0.1:0",
                              libm2n.ReceiverConfig(slots_per_sender=2, slot_bytes=4096,
                                                    handshake_timeout_s=0.5))
    pumped = _Pumped(rx)
    yield pumped
    pumped.stop.set()
    pumped.thread.join(timeout=5)
    rx.close()


def _port(rx) -> int:
    return libm2n.parse_url(rx.url).port


@given(st.binary(min_size=1, max_size=600))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_tcp_garbage_is_refused_and_receiver_survives(tcp_rx, data):
    errors = tcp_rx.stats()["errors"]
    with socket.create_connection(("127.0.0.1", _port(tcp_rx)), timeout=5) as s:
        s.sendall(data)
        if len(data) >= hdr.HEADER_SIZE:
            h, body = _recv_frame(s)
            assert h.kind == hdr.Kind.ERROR and body
            assert _closed(s)
            assert tcp_rx.stats()["errors"] == errors + 1
    # The receiver still serves a well-behaved sender.
    with libm2n.connect(tcp_rx.url, libm2n.SenderConfig(sender_id=7)) as tx:
        tx.send(b"ok").result(timeout=5)
        with tcp_rx.recv(timeout=5) as m:
            assert bytes(m.payload) == b"ok"


def test_sender_reconnects_with_its_id_right_after_closing(tcp_rx):
    # A restarted sender reuses its id at once; the receiver may not have read the old
    # connection's CLOSE yet, and must admit the new one rather than refuse a "duplicate".
    for i in range(10):
        with libm2n.connect(tcp_rx.url, libm2n.SenderConfig(sender_id=21)) as tx:
            tx.send(bytes([i])).result(timeout=5)
            with tcp_rx.recv(timeout=5) as m:
                assert bytes(m.payload) == bytes([i])


def _hello(sock: socket.socket, sender_id: int = 3) -> hdr.Header:
    sock.sendall(hdr.pack(hdr.Header(kind=hdr.Kind.HELLO, sender_id=sender_id)))
    h, _ = _recv_frame(sock)
    assert h.kind == hdr.Kind.WELCOME
    return h


@pytest.mark.parametrize("fields, message", [
    (dict(rows=1, cols=8, dtype=hdr.DType.FLOAT32, payload_bytes=8), b"rows*cols*itemsize"),
    (dict(rows=1, cols=8192, payload_bytes=8192), b"exceeds the slot size 4096"),
    (dict(slot=9, rows=1, cols=1, payload_bytes=1), b"slot 9 out of range"),
    (dict(seq=5, rows=1, cols=1, payload_bytes=1), b"out-of-order frame"),
    (dict(sender_id=4, rows=1, cols=1, payload_bytes=1), b"sender id 4 on a connection"),
    (dict(kind=hdr.Kind.CREDIT), b"unexpected CREDIT frame"),
])
def test_bad_frame_after_handshake_closes_only_that_peer(tcp_rx, fields, message):
    good = libm2n.connect(tcp_rx.url, libm2n.SenderConfig(sender_id=11))
    try:
        errors = tcp_rx.stats()["errors"]
        with socket.create_connection(("127.0.0.1", _port(tcp_rx)), timeout=5) as s:
            _hello(s)
            fields = {"kind": hdr.Kind.DATA, "sender_id": 3, **fields}
            s.sendall(hdr.pack(hdr.Header(**fields)))
            h, body = _recv_frame(s)
            assert h.kind == hdr.Kind.ERROR and message in body
            assert _closed(s)
        assert tcp_rx.stats()["errors"] == errors + 1
        good.send(b"still fine").result(timeout=5)
        with tcp_rx.recv(timeout=5) as m:
            assert m.sender_id == 11 and bytes(m.payload) == b"still fine"
    finally:
        good.close()


def test_silent_connection_is_dropped_after_handshake_timeout(tcp_rx):
    with socket.create_connection(("127.0.0.1", _port(tcp_rx)), timeout=5) as s:
        h, body = _recv_frame(s, timeout=5)
        assert h.kind == hdr.Kind.ERROR and b"no HELLO" in body


def test_receiver_refuses_other_header_version(tcp_rx):
    raw = bytearray(hdr.pack(hdr.Header(kind=hdr.Kind.HELLO, sender_id=1)))
    struct.pack_into("<H", raw, 4, 2)
    with socket.create_connection(("127.0.0.1", _port(tcp_rx)), timeout=5) as s:
        s.sendall(raw)
        h, body = _recv_frame(s)
        assert h.kind == hdr.Kind.ERROR
        assert body == b"version mismatch: peer speaks header v2, we speak v1"


def test_sender_refuses_receiver_of_other_version():
    srv = socket.create_server(("127.0.0.1", 0))

    def fake_receiver() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(hdr.HEADER_SIZE)
            raw = bytearray(hdr.pack(hdr.Header(kind=hdr.Kind.WELCOME, rows=4, cols=64)))
            struct.pack_into("<H", raw, 4, 9)
            conn.sendall(raw)
            conn.recv(1)

    t = threading.Thread(target=fake_receiver, daemon=True)
    t.start()
    try:
        with pytest.raises(libm2n.VersionMismatch, match="version mismatch: peer speaks header v9"):
            libm2n.connect(f"tcp://127.0.0.1:{srv.getsockname()[1]}",
                           libm2n.SenderConfig(sender_id=1))
    finally:
        srv.close()
        t.join(timeout=5)
