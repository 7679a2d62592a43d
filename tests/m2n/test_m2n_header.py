"""Header codec, URL parsing and config validation (pure functions, no processes)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import libm2n
from libm2n import header as hdr
from libm2n.errors import InvalidArgument, ProtocolError, VersionMismatch

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(kind=st.sampled_from(list(hdr.Kind)), sender=u32, epoch=u64, slot=u32, seq=u64,
       step=u64, layer=u32, mb=u32, rows=u32, cols=u32, dtype=st.sampled_from(list(hdr.DType)),
       nbytes=u64, tag=u64, trace=st.binary(min_size=16, max_size=16),
       span=st.binary(min_size=8, max_size=8))
@settings(max_examples=200, deadline=None)
def test_pack_unpack_roundtrip(kind, sender, epoch, slot, seq, step, layer, mb, rows, cols,
                               dtype, nbytes, tag, trace, span):
    h = hdr.Header(kind=kind, sender_id=sender, epoch=epoch, slot=slot, seq=seq, step=step,
                   layer=layer, micro_batch=mb, rows=rows, cols=cols, dtype=dtype,
                   payload_bytes=nbytes, tag=tag, trace_id=trace, span_id=span)
    raw = hdr.pack(h)
    assert len(raw) == hdr.HEADER_SIZE == 128
    assert hdr.unpack(raw) == h


@given(st.binary(min_size=0, max_size=300))
@settings(max_examples=300, deadline=None)
def test_unpack_garbage_only_raises_protocol_error(data):
    try:
        h = hdr.unpack(data)
    except ProtocolError:
        return
    # Only a well-formed frame gets here; validation then must not crash either.
    try:
        hdr.validate(h, sender_id=h.sender_id, nslots=4, slot_capacity=1 << 20)
    except ProtocolError:
        pass


@given(st.binary(min_size=128, max_size=128), st.integers(0, 127), st.integers(0, 255))
@settings(max_examples=200, deadline=None)
def test_mutated_valid_frame_is_rejected_or_valid(seed, pos, byte):
    good = bytearray(hdr.pack(hdr.Header(kind=hdr.Kind.DATA, rows=2, cols=3,
                                         dtype=hdr.DType.FLOAT32, payload_bytes=24)))
    good[pos] = byte
    try:
        h = hdr.unpack(bytes(good))
        hdr.validate(h, sender_id=0, nslots=4, slot_capacity=1024)
    except ProtocolError as exc:
        assert str(exc)  # one clear line
        assert "\n" not in str(exc)


def test_version_mismatch_is_named():
    raw = bytearray(hdr.pack(hdr.Header(kind=hdr.Kind.HELLO)))
    struct.pack_into("<H", raw, 4, 2)
    msg = "version mismatch: peer speaks header v2, we speak v1"
    with pytest.raises(VersionMismatch, match=msg):
        hdr.unpack(bytes(raw))


@pytest.mark.parametrize("fields, message", [
    (dict(rows=2, cols=3, dtype=hdr.DType.FLOAT32, payload_bytes=25), "rows\\*cols\\*itemsize"),
    (dict(rows=1, cols=4096, dtype=hdr.DType.UINT8, payload_bytes=4096), "exceeds the slot size"),
    (dict(rows=1, cols=1, dtype=99, payload_bytes=1), "unknown dtype code 99"),
    (dict(slot=4, rows=1, cols=1, payload_bytes=1), "slot 4 out of range"),
    (dict(sender_id=7, rows=1, cols=1, payload_bytes=1), "sender id 7 on a connection"),
])
def test_validate_names_the_bad_field(fields, message):
    h = hdr.Header(kind=hdr.Kind.DATA, **fields)
    with pytest.raises(ProtocolError, match=message):
        hdr.validate(h, sender_id=0, nslots=4, slot_capacity=1024)


def test_bad_magic_and_kind():
    raw = bytearray(hdr.pack(hdr.Header(kind=hdr.Kind.DATA)))
    raw[0] ^= 0xFF
    with pytest.raises(ProtocolError, match="bad magic"):
        hdr.unpack(bytes(raw))
    raw = bytearray(hdr.pack(hdr.Header(kind=hdr.Kind.DATA)))
    struct.pack_into("<H", raw, 6, 42)
    with pytest.raises(ProtocolError, match="unknown frame kind 42"):
        hdr.unpack(bytes(raw))
    with pytest.raises(ProtocolError, match="short header"):
        hdr.unpack(b"\0" * 10)


@pytest.mark.parametrize("url, message", [
    ("nope", "expected shm://NAME"),
    ("udp://a:1", "unknown scheme 'udp'"),
    ("shm://bad/name", "shm name must be"),
    ("tcp://localhost", "expected tcp://HOST:PORT"),
    ("tcp://h:99999", "Port out of range"),
])
def test_bad_urls(url, message):
    with pytest.raises(InvalidArgument, match=message):
        libm2n.parse_url(url)


def test_good_urls():
    assert libm2n.parse_url("shm://a-b.c_1").url == "shm://a-b.c_1"
    assert libm2n.parse_url("tcp://127.0.0.1:5000") == libm2n.Endpoint("tcp", "127.0.0.1", 5000)
    assert libm2n.parse_url("rdma://mlx5_0:7471").host == "mlx5_0"


def test_config_validation():
    with pytest.raises(InvalidArgument, match="slots_per_sender"):
        libm2n.ReceiverConfig(slots_per_sender=0)
    with pytest.raises(InvalidArgument, match="sender_id"):
        libm2n.SenderConfig(sender_id=-1)
    with pytest.raises(InvalidArgument, match="peer_timeout_s"):
        libm2n.SenderConfig(sender_id=1, peer_timeout_s=0)
    with pytest.raises(InvalidArgument, match="spin_us"):
        libm2n.ReceiverConfig(spin_us=-1)


def test_as_payload_rejects_unsupported():
    with pytest.raises(InvalidArgument, match="cannot send a dict"):
        libm2n.as_payload({})
