"""Cross-host transport: persistent TCP connections, payloads ``recv_into`` the slot.

One connection per (sender, receiver) pair, opened once (``TCP_NODELAY``). A DATA frame is the
128-byte header immediately followed by the payload; the receiver's per-connection reader thread
validates the header (including that the payload fits the slot) *before* reading the payload
straight into the slot memory. CREDIT frames travel the other direction of the same connection,
read by the sender's own reader thread, so they never queue behind payloads.
"""

from __future__ import annotations

import mmap
import socket
from typing import Any

from libm2n.base import Endpoint
from libm2n.errors import InvalidArgument
from libm2n.fastpath import pack_fields
from libm2n.header import HEADER_SIZE, Kind
from libm2n.stream import sendmsg_all
from libm2n.stream_rx import StreamReceiver
from libm2n.stream_tx import META_NBYTES, StreamSender

_DATA = int(Kind.DATA)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_tcp(ep: Endpoint) -> tuple[socket.socket, int]:
    """A listening socket on ``ep.host:ep.port`` and its real port (also the rdma side channel)."""
    sock = socket.socket(_family(ep.host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ep.host, ep.port))
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot listen on {ep.url}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock, sock.getsockname()[1]


def connect_tcp(ep: Endpoint, timeout: float) -> socket.socket:
    """One connection attempt to ``ep.host:ep.port`` with ``TCP_NODELAY`` (OSError on failure)."""
    sock = socket.socket(_family(ep.host), socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    try:
        sock.connect((ep.host, ep.port))
    except OSError:
        sock.close()
        raise
    return sock


class TcpReceiver(StreamReceiver):
    """``tcp://HOST:PORT`` receiver (port 0 picks one; ``.url`` has the real port)."""

    streams_payload = True

    def _listen(self, ep: Endpoint) -> tuple[socket.socket, str]:
        sock, port = listen_tcp(ep)
        return sock, Endpoint("tcp", ep.host, port).url

    def _make_memory(self, sender_id: int, size: int) -> tuple[mmap.mmap, list[int]]:
        return mmap.mmap(-1, size), []



class TcpSender(StreamSender):
    """Sender to a ``tcp://HOST:PORT`` receiver."""

    def _connect_once(self, ep: Endpoint) -> socket.socket:
        return connect_tcp(ep, self.config.connect_timeout_s)

    def _write(self, slot: int, seq: int, meta: tuple, data: Any) -> None:
        header = pack_fields(_DATA, self.sender_id, self.epoch, slot, seq, *meta)
        n = meta[META_NBYTES]
        sendmsg_all(self._sock, [header, data] if n else [header], HEADER_SIZE + n)
