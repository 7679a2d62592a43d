"""The one place that picks libm2n's per-message hot path: C (``libm2n._fast``) or pure Python.

The C extension is built by ``pip install -e .`` when a C compiler is present (optional in
``pyproject.toml``); without it, or with ``LIBM2N_PURE_PYTHON=1`` in the environment when this
module is first imported, the pure-Python reference implementations below run instead. Both
follow the same contracts (checked against each other by ``tests/m2n/test_m2n_fastpath.py``):

``pack_fields(kind, sender_id, epoch, slot, seq, step, layer, micro_batch, rows, cols, dtype,
payload_bytes, tag, trace_id, span_id) -> bytes``
    The 128-byte header (:func:`libm2n.header.pack_fields`); ProtocolError for a field that does
    not fit its wire width.
``unpack_fields(data) -> fields``
    :func:`libm2n.header.unpack_fields`: decode + magic/version/kind/padding checks.
``check(buf, off, sender_id, nslots, capacity) -> fields``
    ``unpack_fields(buf[off:off + 128])`` then :func:`libm2n.header.validate_fields`; the same
    exceptions with the same messages.
``read_headers(fd, hbuf, got, sender_id, nslots, capacity) -> None | (got, frames, error)``
    One non-blocking read of header frames from socket ``fd`` into ``hbuf[got:]``
    (BlockingIOError: nothing waiting; None: end of stream), then ``check`` of each whole frame
    in order: the new fill level (a partial frame moved to the front), the fields of the good
    frames, and the ProtocolError of the first bad one (None if none; parsing stops there).
``payload(obj) -> (buffer, nbytes, rows, cols, dtype)``
    :func:`libm2n.payload.as_payload` for sending: ``buffer`` exports ``nbytes`` C-contiguous bytes
    (the object itself for numpy arrays and bytes-likes, so nothing is wrapped per message).
``new_header(fields) -> Header``
    :func:`libm2n.header.new_header` (the :class:`Header` of a fields tuple).
``shm_send(fd, mem, off, buffer, <the 15 pack_fields arguments>) -> None | bytes``
    Copy ``payload_bytes`` bytes of ``buffer`` into ``mem[off:]``, then write the DATA header to
    the socket ``fd`` without blocking; returns the header bytes still to be sent (the caller
    sends them with a blocking ``sendall``), or None.

``ACTIVE`` is True when the C versions are in use; ``REASON`` says why not otherwise.

This module imports only :mod:`libm2n.errors`, :mod:`libm2n.header` and :mod:`libm2n.payload`
(whose torch dtype table the C payload path is given once torch is in use): the interface and
every transport import it, never the other way.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from libm2n.errors import ProtocolError
from libm2n.header import F_PAYLOAD_BYTES, FIELDS, HEADER_SIZE, Header, validate_fields
from libm2n.header import new_header as py_new_header
from libm2n.header import pack_fields as py_pack_fields
from libm2n.header import unpack_fields as py_unpack_fields
from libm2n.payload import TORCH_CODES_BY_NAME, as_payload

__all__ = ["ACTIVE", "REASON", "check", "new_header", "pack_fields", "payload", "read_headers",
           "shm_send", "unpack_fields"]


def py_check(buf, off: int, sender_id: int | None, nslots: int,  # noqa: ANN001 - bytes-like
             capacity: int) -> tuple:
    """Pure-Python :func:`check` (the reference)."""
    f = py_unpack_fields(buf[off:off + HEADER_SIZE])
    validate_fields(f, sender_id=sender_id, nslots=nslots, slot_capacity=capacity)
    return f


def py_read_headers(fd: int, hbuf: bytearray, got: int, sender_id: int | None, nslots: int,
                    capacity: int) -> tuple[int, list[tuple], Exception | None] | None:
    """Pure-Python :func:`read_headers` (``fd`` must be non-blocking)."""
    if not 0 <= got < len(hbuf):
        raise ValueError("read_headers: bad fd or fill level")
    n = os.readv(fd, [memoryview(hbuf)[got:]])  # BlockingIOError when nothing is waiting
    if n == 0:
        return None
    end, off, frames = got + n, 0, []
    while end - off >= HEADER_SIZE:
        try:
            frames.append(py_check(hbuf, off, sender_id, nslots, capacity))
        except ProtocolError as exc:
            return 0, frames, exc
        off += HEADER_SIZE
    hbuf[:end - off] = hbuf[off:end]
    return end - off, frames, None


def py_payload(obj: Any) -> tuple[Any, int, int, int, int]:
    """Pure-Python :func:`payload` (a wrapper of :func:`libm2n.payload.as_payload`)."""
    view, rows, cols, code = as_payload(obj)
    return view, len(view), rows, cols, code


def py_shm_send(fd: int, mem, off: int, buffer, *fields) -> bytes:  # noqa: ANN001
    """Pure-Python :func:`shm_send`: copies, and leaves the whole header to the caller."""
    n = fields[F_PAYLOAD_BYTES]  # pack_fields order starts like FIELDS
    mem[off:off + n] = buffer
    return py_pack_fields(*fields)


_API_VERSION = 1  # must match API_VERSION in _fast.c


def _load() -> tuple[Any, str]:
    if os.environ.get("LIBM2N_PURE_PYTHON", "") not in ("", "0"):
        return None, "LIBM2N_PURE_PYTHON is set"
    try:
        from libm2n import _fast
    except ImportError as exc:
        return None, f"libm2n._fast is not built ({exc})"
    got = getattr(_fast, "API_VERSION", 0)
    if got != _API_VERSION:  # an old .so left behind by an edit of _fast.c without a rebuild
        return None, (f"libm2n._fast is stale (API v{got}, this code needs v{_API_VERSION}): "
                      "run pip install -e . --no-deps")
    try:
        import numpy

        _fast.set_ndarray(numpy.ndarray)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return _fast, ""


_fast, REASON = _load()
ACTIVE: bool = _fast is not None

if _fast is not None:
    _c_payload = _fast.payload

    def payload(obj: Any) -> tuple[Any, int, int, int, int]:
        """See the module docstring (C for the common cases, Python for the rest)."""
        got = _c_payload(obj)
        if got is not None:
            return got
        if type(obj).__module__.startswith("torch"):
            _register_torch()  # torch is imported by now: the next tensor takes the C path
        return py_payload(obj)

    def _register_torch() -> None:
        import torch

        if not _torch_registered:
            codes = {getattr(torch, name): code for name, code in TORCH_CODES_BY_NAME}
            _fast.set_torch(torch.Tensor, codes)
            _torch_registered.append(True)

    _torch_registered: list[bool] = []

    new_header = functools.partial(_fast.new_header, Header, FIELDS)
    pack_fields = _fast.pack
    unpack_fields = _fast.unpack
    check = _fast.check
    read_headers = _fast.read_headers
    shm_send = _fast.shm_send
else:
    payload = py_payload
    new_header = py_new_header
    pack_fields = py_pack_fields
    unpack_fields = py_unpack_fields
    check = py_check
    read_headers = py_read_headers
    shm_send = py_shm_send
