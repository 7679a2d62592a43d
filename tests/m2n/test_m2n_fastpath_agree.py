"""The C hot path (libm2n._fast) against its pure-Python reference (libm2n.header/fastpath).

Both must produce the same bytes, accept the same frames and reject the rest with the same
exception type and message, and the C code must survive garbage of any length. (Skipped where
the extension is not built; ``test_m2n_fastpath.py`` fails there instead.)
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import libm2n
from libm2n import fastpath
from libm2n import header as hdr
from libm2n.errors import ProtocolError
from libm2n.payload import TORCH_CODES_BY_NAME

torch.set_num_threads(1)
fast = pytest.importorskip("libm2n._fast")
fast.set_ndarray(np.ndarray)
fast.set_torch(torch.Tensor, {getattr(torch, n): c for n, c in TORCH_CODES_BY_NAME})


def c_payload(obj):
    """What fastpath.payload does when the extension is active: C first, Python for the rest."""
    got = fast.payload(obj)
    return fastpath.py_payload(obj) if got is None else got


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
# (offset, width) of every header field in libm2n.header's layout, for corruptions
LAYOUT = {"magic": (0, 4), "version": (4, 2), "kind": (6, 2), "epoch": (8, 8),
          "sender_id": (16, 4), "slot": (20, 4), "seq": (24, 8), "step": (32, 8),
          "layer": (40, 4), "micro_batch": (44, 4), "rows": (48, 4), "cols": (52, 4),
          "dtype": (56, 2), "reserved": (58, 2), "pad": (60, 4), "payload_bytes": (64, 8),
          "tag": (72, 8), "trace_id": (80, 16), "span_id": (96, 8), "tail": (104, 24)}


def outcome(fn, *args):
    """What ``fn(*args)`` did: ("ok", result) or (exception type, message)."""
    try:
        return "ok", fn(*args)
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return type(exc), str(exc)


fields_st = st.tuples(
    st.sampled_from(list(hdr.Kind)), u32, u64, u32, u64, u64, u32, u32, u32, u32,
    st.sampled_from(list(hdr.DType)), u64, u64, st.binary(min_size=16, max_size=16),
    st.binary(min_size=8, max_size=8))


@given(fields_st)
@settings(max_examples=300, deadline=None)
def test_pack_is_byte_identical(fields):
    raw = fast.pack(*fields)
    assert raw == hdr.pack_fields(*fields)
    assert fast.unpack(raw) == hdr.unpack_fields(raw)
    h = fast.new_header(hdr.Header, hdr.FIELDS, fast.unpack(raw))
    assert type(h) is hdr.Header and h == hdr.unpack(raw) == hdr.new_header(fast.unpack(raw))
    assert hdr.fields_of(h) == fast.unpack(raw)


@given(fields_st, st.integers(0, 12), st.sampled_from([-1, 2**16, 2**32, 2**64]))
@settings(max_examples=200, deadline=None)
def test_pack_out_of_range_is_a_protocol_error_in_both(fields, index, value):
    bad = list(fields)
    bad[index] = value
    widths = [2, 4, 8, 4, 8, 8, 4, 4, 4, 4, 2, 8, 8]
    if 0 <= value < 2 ** (8 * widths[index]):
        return  # fits after all
    for fn in (fast.pack, hdr.pack_fields):
        with pytest.raises(ProtocolError, match="header field out of range"):
            fn(*bad)


def check_both(data, off, sender_id, nslots, cap):
    c = outcome(fast.check, data, off, sender_id, nslots, cap)
    p = outcome(fastpath.py_check, data, off, sender_id, nslots, cap)
    assert c == p
    assert outcome(fast.unpack, data[off:off + 128]) == outcome(hdr.unpack_fields,
                                                                data[off:off + 128])
    return c


conn_st = st.tuples(st.none() | st.integers(0, 2**32 - 1), st.integers(0, 5000),
                    st.integers(0, 2**40))


@given(st.binary(min_size=0, max_size=300), st.integers(0, 320), conn_st)
@settings(max_examples=300, deadline=None)
def test_random_bytes_same_verdict_and_message(data, off, conn):
    check_both(data, off, *conn)


def valid(kind=hdr.Kind.DATA, **kw) -> bytearray:
    base = dict(sender_id=7, slot=1, rows=2, cols=3, dtype=hdr.DType.FLOAT32, payload_bytes=24)
    if kind != hdr.Kind.DATA:
        base = dict(sender_id=7, slot=1)
    base.update(kw)
    return bytearray(hdr.pack(hdr.Header(kind=kind, **base)))


@given(st.sampled_from(list(hdr.Kind)), st.sampled_from(sorted(LAYOUT)), st.data(), conn_st)
@settings(max_examples=600, deadline=None)
def test_single_field_corruption_same_verdict_and_message(kind, field, data, conn):
    frame = valid(kind)
    off, width = LAYOUT[field]
    frame[off:off + width] = data.draw(st.binary(min_size=width, max_size=width))
    check_both(bytes(frame), 0, *conn)
    check_both(bytes(frame), 0, 7, 4, 1024)  # the frame's own connection


CASES = {
    "good": (valid(), "ok"),
    "bad magic": (valid()[:0] + b"XXXX" + valid()[4:], "bad magic"),
    "version": (valid()[:4] + (2).to_bytes(2, "little") + valid()[6:], "version mismatch"),
    "kind 0": (valid()[:6] + b"\0\0" + valid()[8:], "unknown frame kind 0"),
    "kind 99": (valid()[:6] + (99).to_bytes(2, "little") + valid()[8:], "unknown frame kind"),
    "reserved": (valid()[:58] + b"\1\0" + valid()[60:], "reserved header bytes"),
    "tail": (valid()[:127] + b"\1", "reserved header bytes"),
    "dtype": (valid(dtype=0), "unknown dtype code 0"),
    "dtype 11": (valid(dtype=11, payload_bytes=6), "unknown dtype code 11"),
    "slot": (valid(slot=4), "slot 4 out of range"),
    "sizes": (valid(payload_bytes=25), "rows*cols*itemsize = 2*3*4 != payload_bytes 25"),
    "overflow": (valid(rows=2**32 - 1, cols=2**32 - 1, dtype=hdr.DType.FLOAT64,
                       payload_bytes=2**64 - 1), "rows*cols*itemsize"),
    "too big": (valid(rows=64, cols=8, payload_bytes=2048), "exceeds the slot size 1024"),
    "sender": (valid(sender_id=8), "sender id 8 on a connection opened by 7"),
    "credit slot": (valid(hdr.Kind.CREDIT, slot=9), "credit for slot 9 out of range (4 slots)"),
    "error len": (valid(hdr.Kind.ERROR, payload_bytes=5000), "error message of 5000 bytes"),
    "close payload": (valid(hdr.Kind.CLOSE, payload_bytes=1), "CLOSE frame with payload_bytes 1"),
    "short": (valid()[:100], "short header: 100 bytes, expected 128"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_named_bad_frames(case):
    frame, expect = CASES[case]
    got = check_both(bytes(frame), 0, 7, 4, 1024)
    if expect == "ok":
        assert got[0] == "ok"
    else:
        assert issubclass(got[0], ProtocolError) and expect in got[1], got


def test_check_walks_a_batch_and_bounds_checks_offsets():
    frames = b"".join(bytes(valid(seq=i)) for i in range(3)) + bytes(valid())[:50]
    for i in range(3):
        assert fast.check(frames, 128 * i, 7, 4, 1024)[4] == i
    for off in (384, 500, 10**9):  # past the end: a short header, never a read out of bounds
        assert check_both(frames, off, 7, 4, 1024)[0] is ProtocolError
    with pytest.raises(ValueError):
        fast.check(frames, -1, 7, 4, 1024)


def read_both(chunks, conn):
    """Feed ``chunks`` through a socketpair to C and Python read_headers; compare every step."""
    results = []
    for impl in (fast.read_headers, fastpath.py_read_headers):
        a, b = socket.socketpair()
        b.setblocking(False)
        hbuf, got, steps = bytearray(64 * 128), 0, []
        try:
            for chunk in chunks:
                a.sendall(chunk)
                r = outcome(impl, b.fileno(), hbuf, got, *conn)
                if r[0] == "ok" and r[1] is not None:
                    got, frames, err = r[1]
                    r = ("ok", (got, frames, None if err is None else (type(err), str(err))))
                    steps.append(r)
                    if err is not None:
                        break
                else:
                    steps.append(r)
            a.close()
            steps.append(outcome(impl, b.fileno(), hbuf, got, *conn))  # EOF (or leftovers)
        finally:
            b.close()
        results.append(steps)
    assert results[0] == results[1]
    return results[0]


@given(st.lists(st.sampled_from(["good", "bad", "close", "junk"]), min_size=1, max_size=12),
       st.integers(1, 300), st.data())
@settings(max_examples=100, deadline=None)
def test_read_headers_agrees_on_streams(kinds, cut, data):
    frames = {"good": bytes(valid()), "bad": bytes(valid(slot=9)),
              "close": bytes(valid(hdr.Kind.CLOSE)), "junk": data.draw(st.binary(max_size=200))}
    stream = b"".join(frames[k] for k in kinds)
    chunks = [stream[i:i + cut] for i in range(0, len(stream), cut)] or [b""]
    read_both([c for c in chunks if c], (7, 4, 1024))


def test_read_headers_nothing_waiting_and_eof():
    a, b = socket.socketpair()
    b.setblocking(False)
    for impl in (fast.read_headers, fastpath.py_read_headers):
        with pytest.raises(BlockingIOError):
            impl(b.fileno(), bytearray(256), 0, 7, 4, 1024)
        with pytest.raises(ValueError):
            impl(b.fileno(), bytearray(256), 256, 7, 4, 1024)  # no room: refused, no overflow
    steps = read_both([bytes(valid(seq=0)) + bytes(valid(seq=1))[:60]], (7, 4, 1024))
    assert steps[0][1][0] == 60 and [f[4] for f in steps[0][1][1]] == [0]
    assert steps[-1] == ("ok", None)  # EOF
    a.close()
    b.close()


PAYLOADS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(24, dtype=np.int64).reshape(2, 3, 4),
    np.zeros((5,), dtype=np.float16),
    np.array([True, False, True]),
    np.array(3.5, dtype=np.float64),
    np.arange(8, dtype=np.int8), np.arange(8, dtype=np.int16), np.arange(8, dtype=np.int32),
    np.arange(8, dtype=np.uint8),
    np.arange(20, dtype=np.float32).reshape(4, 5)[:, 1:3],  # non-contiguous: Python path
    np.arange(6, dtype=np.float32).reshape(2, 3).T,  # Fortran order: Python path
    np.arange(4, dtype=">f4"),
    np.zeros((0, 4), dtype=np.float32),
    b"hello", bytearray(b"\x00\x01\x02"), memoryview(b"abcdef")[1:4],
    memoryview(np.arange(6, dtype=np.float32)),
    torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
    torch.arange(6, dtype=torch.float32),
    torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
    torch.ones(2, 3, requires_grad=True),
    torch.ones(4, 4)[:, :2],  # non-contiguous: Python path
    torch.zeros(0, 3),
    torch.tensor(2.5),
    torch.nn.Parameter(torch.ones(3)),  # a subclass: Python path
    torch.ones(3, dtype=torch.complex64),  # refused by both
]


@pytest.mark.parametrize("i", range(len(PAYLOADS)))
def test_payload_agrees_with_as_payload(i):
    obj = PAYLOADS[i]
    c = outcome(c_payload, obj)
    p = outcome(fastpath.py_payload, obj)
    assert c[0] == p[0]
    if c[0] == "ok":
        (cbuf, *cmeta), (pbuf, *pmeta) = c[1], p[1]
        assert cmeta == pmeta
        assert bytes(memoryview(cbuf).cast("B")) == bytes(memoryview(pbuf).cast("B"))
        assert len(memoryview(cbuf).cast("B")) == cmeta[0]
    else:
        assert c == p


def test_torch_tensors_take_the_c_path_and_stay_alive():
    t = torch.arange(1000, dtype=torch.float32).reshape(10, 100) * 3
    want = t.numpy().tobytes()
    buf, nbytes, rows, cols, code = fast.payload(t)
    assert type(buf).__name__ == "Span" and (nbytes, rows, cols, code) == (4000, 10, 100, 8)
    del t  # the Span holds the tensor: its memory stays valid
    assert bytes(memoryview(buf)) == want
    with pytest.raises(TypeError):
        memoryview(buf)[0] = 1  # read-only


@pytest.mark.parametrize("bad", [3, "text", 1.5, np.float32(2.0), object()])
def test_payload_refuses_what_as_payload_refuses(bad):
    assert fast.payload(bad) is None  # not a case C takes: the Python path refuses it
    assert outcome(c_payload, bad)[0] is libm2n.InvalidArgument


def test_shm_send_copies_and_writes_the_header():
    a, b = socket.socketpair()
    try:
        mem = bytearray(4096)
        data = np.arange(64, dtype=np.float32)
        fields = (1, 7, 3, 2, 5, 1, 2, 3, 1, 64, int(hdr.DType.FLOAT32), 256, 99,
                  b"t" * 16, b"s" * 8)
        assert fast.shm_send(a.fileno(), mem, 1024, data, *fields) is None
        assert bytes(mem[1024:1280]) == data.tobytes() and not any(mem[:1024])
        assert b.recv(256) == hdr.pack_fields(*fields)
        # Reference path: copies too, and hands back the whole header to send.
        mem2 = memoryview(bytearray(4096))
        assert fastpath.py_shm_send(a.fileno(), mem2, 1024, memoryview(data).cast("B"),
                                    *fields) == hdr.pack_fields(*fields)
        assert bytes(mem2[1024:1280]) == data.tobytes()
        # Every length is checked before a byte moves.
        for off, n in ((4000, 256), (-1, 256), (0, 255), (0, 2**40)):
            f = list(fields)
            f[11] = n
            with pytest.raises((ValueError, ProtocolError, OverflowError)):
                fast.shm_send(a.fileno(), mem, off, data, *f)
        with pytest.raises(BufferError):
            fast.shm_send(a.fileno(), bytes(4096), 0, data, *fields)  # read-only memory
        with pytest.raises(ProtocolError, match="out of range"):
            fast.shm_send(a.fileno(), mem, 0, data, *fields[:10], 70000, *fields[11:])
    finally:
        a.close()
        b.close()


def test_shm_send_reports_a_full_socket_and_a_dead_one():
    a, b = socket.socketpair()
    mem = bytearray(1024)
    fields = (1, 7, 0, 0, 0, 0, 0, 0, 1, 4, 1, 4, 0, bytes(16), bytes(8))
    a.setblocking(False)
    rest = None
    for _ in range(100000):  # nobody reads b: the buffer fills, the tail comes back
        rest = fast.shm_send(a.fileno(), mem, 0, b"abcd", *fields)
        if rest is not None:
            break
    assert rest is not None and 0 < len(rest) <= 128
    assert hdr.pack_fields(*fields).endswith(rest)
    b.close()
    with pytest.raises(OSError):
        fast.shm_send(a.fileno(), mem, 0, b"abcd", *fields)
    a.close()


