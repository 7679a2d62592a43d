"""Socket-stream machinery shared by the shm and tcp transports.

Every connection is one stream socket carrying 128-byte headers (:mod:`libm2n.header`):

* handshake: sender -> ``HELLO`` (sender_id, epoch); receiver -> ``WELCOME`` (rows = slot count,
  cols = slot payload capacity) or ``ERROR``. shm passes the slot memory's fd with the WELCOME.
* sender -> receiver: ``DATA`` frames (tcp: header followed by the payload bytes, read with
  ``recv_into`` straight into the slot; shm: the payload is already in the shared slot, the header
  is the notification), and ``CLOSE`` on a clean shutdown.
* receiver -> sender: ``CREDIT`` frames (slot returned), ``ERROR`` (tag = :class:`ErrorCode`,
  followed by a utf-8 message of ``payload_bytes``), ``CLOSE``.

The two directions never share a queue, so credits are never stuck behind payloads. The
receiver reads DATA frames of all its connections from one epoll set, in the thread that calls
``recv``/``poll`` (no thread hand-off on the hot path); the sender has one reader thread per
connection for CREDIT/ERROR/CLOSE frames.

This module holds the framing helpers; :mod:`libm2n.stream_rx` and :mod:`libm2n.stream_tx` the
two ends.
"""

from __future__ import annotations

import enum
import select
import socket
import time

from libm2n.errors import (
    M2NError,
    PeerLost,
    ProtocolError,
    VersionMismatch,
)
from libm2n.header import (
    MAX_ERROR_BYTES,
    Header,
    Kind,
    pack,
)


class ErrorCode(enum.IntEnum):
    """``tag`` of an ERROR frame: which exception the sender raises."""

    PROTOCOL = 1
    VERSION = 2
    REFUSED = 3


class Eof(Exception):
    """Clean end of stream at a frame boundary."""


def read_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; Eof at a frame boundary, PeerLost in the middle of one."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0:
                raise Eof()
            raise PeerLost(f"connection closed in the middle of a frame ({got}/{n} bytes)")
        got += k


def sendmsg_all(sock: socket.socket, bufs: list, total: int) -> None:
    """``sendmsg`` of ``total`` bytes of buffers that copes with partial writes (one syscall in
    the common case). ``bufs`` are any C-contiguous buffers (``len`` of one need not be its byte
    count, e.g. a 2-D array)."""
    sent = sock.sendmsg(bufs)
    if sent == total:
        return
    views = [memoryview(b).cast("B") for b in bufs]
    for v in views:
        if sent >= len(v):
            sent -= len(v)
            continue
        sock.sendall(v[sent:])
        sent = 0


def credit_frame(sender_id: int, slot: int) -> bytes:
    """The CREDIT frame returning ``slot`` to ``sender_id`` (a constant per slot: both ends
    precompute them, so a credit costs no header packing or parsing on the hot path)."""
    return pack(Header(kind=Kind.CREDIT, sender_id=sender_id, slot=slot))


def error_frame(exc: Exception, sender_id: int = 0) -> bytes:
    """An ERROR frame (header + message) describing ``exc``."""
    code = (ErrorCode.VERSION if isinstance(exc, VersionMismatch) else
            ErrorCode.REFUSED if isinstance(exc, Refused) else ErrorCode.PROTOCOL)
    msg = str(exc).encode()[:MAX_ERROR_BYTES]
    h = Header(kind=Kind.ERROR, sender_id=sender_id, tag=code, payload_bytes=len(msg))
    return pack(h) + msg


def error_from_frame(h: Header, text: str) -> M2NError:
    if h.tag == ErrorCode.VERSION:
        return VersionMismatch(f"receiver refused us: {text}")
    if h.tag == ErrorCode.REFUSED:
        return PeerLost(f"receiver refused us: {text}")
    return ProtocolError(f"receiver reported a protocol error: {text}")


class Refused(ProtocolError):
    """The receiver cannot take this sender (duplicate id, full)."""


def shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def close_fd(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass


def send_all_nb(sock: socket.socket, data: bytes, timeout: float = 5.0) -> None:
    """``sendall`` for a non-blocking socket, waiting at most ``timeout`` for buffer space."""
    try:
        sent = sock.send(data)  # the common case: the whole frame in one syscall
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    deadline = time.monotonic() + timeout
    while view:
        try:
            n = sock.send(view)
            view = view[n:]
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("peer does not read its socket") from None
            select.select([], [sock], [], left)
