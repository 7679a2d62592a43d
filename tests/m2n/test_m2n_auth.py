"""Authenticated links: a receiver given a cluster token admits only senders that prove they
hold it (libm2n/auth.py), before it allocates any slot memory for them."""

from __future__ import annotations

import socket

import pytest
import torch
from m2n_peer import listen_url

import libm2n
from libm2n.auth import check_hello_tag, hello_tag
from libm2n.header import HEADER_SIZE, Header, Kind, pack, unpack

TOKEN = b"t" * 32


def _receiver(transport: str, name: str, token: bytes | None) -> libm2n.Receiver:
    return libm2n.open_receiver(listen_url(transport, name),
                                libm2n.ReceiverConfig(slots_per_sender=2, auth_token=token))


def test_the_token_holder_gets_through_byte_exact(transport, shm_name):
    rx = _receiver(transport, shm_name, TOKEN)
    try:
        data = torch.arange(64, dtype=torch.float32).view(8, 8)
        with libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=3, auth_token=TOKEN)) as tx:
            tx.send(data, tag=1).result(timeout=10)
            with rx.recv(timeout=10) as msg:
                assert torch.equal(msg.tensor(), data)
        assert rx.stats()["refused_unauthenticated"] == 0
    finally:
        rx.close()


@pytest.mark.parametrize("token", [None, b"w" * 32], ids=["no-token", "wrong-token"])
def test_a_sender_without_the_token_is_refused(transport, shm_name, token):
    rx = _receiver(transport, shm_name, TOKEN)
    try:
        with pytest.raises(libm2n.PeerLost, match="failed authentication"):
            libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=4, auth_token=token,
                                                       connect_timeout_s=5))
        assert rx.stats()["refused_unauthenticated"] == 1
        assert rx.stats()["peers_connected"] == 0
        # the id was not taken: the rightful sender with the same id connects afterwards
        with libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=4, auth_token=TOKEN)):
            pass
    finally:
        rx.close()


def test_a_tag_for_another_sender_id_is_refused():
    """A tag proves the token for one sender id only: replaying it under another id fails."""
    rx = libm2n.open_receiver("tcp://127.0.0.1:0", libm2n.ReceiverConfig(auth_token=TOKEN))
    try:
        host, port = rx.url.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(pack(Header(kind=Kind.HELLO, sender_id=6, payload_bytes=32))
                      + hello_tag(TOKEN, 5))
            reply = s.recv(HEADER_SIZE + 4096)
        assert unpack(reply[:HEADER_SIZE]).kind == Kind.ERROR
        assert b"failed authentication" in reply[HEADER_SIZE:]
    finally:
        rx.close()


def test_tags():
    assert check_hello_tag(TOKEN, 7, hello_tag(TOKEN, 7))
    assert not check_hello_tag(TOKEN, 8, hello_tag(TOKEN, 7))
    assert not check_hello_tag(b"x" * 32, 7, hello_tag(TOKEN, 7))
    with pytest.raises(libm2n.InvalidArgument, match="16 bytes"):
        libm2n.SenderConfig(sender_id=1, auth_token=b"short")
    assert "tttt" not in repr(libm2n.ReceiverConfig(auth_token=TOKEN))
