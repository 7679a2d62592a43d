"""RDMA transport: RC queue pairs, WRITE_WITH_IMM into the receiver's registered slot memory.

Contract (``rdma://HOST:PORT``)
------------------------------
* HOST:PORT is the **TCP side channel** (the receiver listens there, port 0 picks one). The verbs
  device is ``$M2N_RDMA_DEVICE`` or the first one; without a device both ends raise
  :class:`~libm2n.errors.TransportUnavailable` ("rdma: no RDMA device found ...").
* The side channel is the tcp transport's control stream, unchanged: HELLO/WELCOME, then one
  JSON line each way (:func:`encode_info`: ``qpn, psn, gid, lid, rkey, addr, size``), then
  CREDIT / ERROR / CLOSE frames for the life of the link. Credits therefore travel exactly as on
  shm/tcp, and the slot/credit/sequence accounting is the shared code
  (:class:`~libm2n.credits.SlotTable` on the receiver, :class:`~libm2n.credits.CreditPool` in
  :class:`~libm2n.stream_tx.StreamSender`).
* Slot ``i`` of a sender lives at ``i * (128 + slot_bytes)`` of the receiver's MR: the 128-byte
  header (:mod:`libm2n.header`), then the payload. The sender copies header + payload into the
  same offset of its own staging MR and posts **one** ``RDMA_WRITE_WITH_IMM`` of
  ``128 + payload`` bytes with ``imm = slot << 20 | (seq & 0xFFFFF)`` (:func:`pack_imm`).
* The receiver sleeps in the same epoll set as every other transport: the completion channel's
  fd joins it. On a receive completion it takes the slot from the immediate, reads the header
  from the slot (zero copy), checks it against the immediate and validates it like any frame,
  re-posts a receive and hands out a view of the payload. ``Message.release`` sends the CREDIT.
* CUDA tensors are staged through host memory (GPUDirect registration is not implemented).

Status: the data path runs end to end in the tests over an in-process stand-in for the verbs
queue pair (``tests/m2n/loopback_verbs.py``); against real pyverbs it has **never run** (no
device on the development machine), see :mod:`libm2n.rdma_verbs`.
"""

from __future__ import annotations

import json
import mmap
import socket
from collections.abc import Callable
from typing import Any

from libm2n.base import Endpoint, ReceiverConfig, SenderConfig
from libm2n.errors import PeerLost, ProtocolError
from libm2n.fastpath import pack_fields, unpack_fields
from libm2n.header import HEADER_SIZE, Header, Kind, new_header, validate_fields
from libm2n.rdma_verbs import QueuePair, list_devices, load_pyverbs, open_context, pick_device
from libm2n.stream_rx import StreamReceiver, _Peer
from libm2n.stream_tx import META_NBYTES, StreamSender
from libm2n.tcp import connect_tcp, listen_tcp

__all__ = ["IMM_SEQ_MASK", "IMM_SLOT_SHIFT", "RdmaReceiver", "RdmaSender", "check_imm",
           "decode_info", "encode_info", "exchange_info", "list_devices", "load_pyverbs",
           "open_context", "pack_imm", "slot_offset", "unpack_imm"]

IMM_SLOT_SHIFT = 20
IMM_SEQ_MASK = (1 << IMM_SLOT_SHIFT) - 1
MAX_IMM_SLOTS = 1 << (32 - IMM_SLOT_SHIFT)  # 4096 = ReceiverConfig's slots_per_sender limit
MAX_INFO_BYTES = 4096
_INFO_INTS = {"qpn": 2**24 - 1, "psn": 2**24 - 1, "lid": 2**16 - 1, "rkey": 2**32 - 1,
              "addr": 2**64 - 1, "size": 2**64 - 1}

# Builds the queue pair of one link: (slot or staging memory, depth) -> QueuePair-like object.
QpFactory = Callable[[mmap.mmap, int], Any]


def pack_imm(slot: int, seq: int) -> int:
    """The 32-bit immediate of a DATA write: slot in the top 12 bits, ``seq`` low 20 bits."""
    if not 0 <= slot < MAX_IMM_SLOTS:
        raise ProtocolError(f"slot {slot} does not fit the immediate (max {MAX_IMM_SLOTS - 1})")
    if seq < 0:
        raise ProtocolError(f"negative sequence number {seq}")
    return slot << IMM_SLOT_SHIFT | (seq & IMM_SEQ_MASK)


def unpack_imm(imm: int) -> tuple[int, int]:
    """``(slot, seq & 0xFFFFF)`` from an immediate (ProtocolError if it is not 32 bits)."""
    if not 0 <= imm < 1 << 32:
        raise ProtocolError(f"immediate {imm} is not a 32-bit value")
    return imm >> IMM_SLOT_SHIFT, imm & IMM_SEQ_MASK


def check_imm(h: Header, slot: int, seq_bits: int) -> None:
    """The in-slot header must be the DATA frame the immediate announced."""
    if h.kind != Kind.DATA:
        raise ProtocolError(f"rdma write into slot {slot} carries a {Kind(h.kind).name} header")
    if h.slot != slot:
        raise ProtocolError(f"header in slot {slot} names slot {h.slot}")
    if h.seq & IMM_SEQ_MASK != seq_bits:
        raise ProtocolError(f"header seq {h.seq} does not match the immediate's {seq_bits}")


def slot_offset(slot: int, slot_bytes: int) -> int:
    """Where slot ``slot`` (header + payload) starts in the slot / staging memory."""
    return slot * (HEADER_SIZE + slot_bytes)


def encode_info(info: dict) -> bytes:
    """One JSON line describing a queue pair (see :func:`decode_info` for the fields)."""
    return json.dumps(info, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode_info(line: bytes) -> dict:
    """Parse and check a peer's QP info line; ProtocolError naming the bad field."""
    try:
        info = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("rdma: QP info is not a JSON object") from None
    if not isinstance(info, dict):
        raise ProtocolError("rdma: QP info is not a JSON object")
    for key, top in _INFO_INTS.items():
        v = info.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
            raise ProtocolError(f"rdma: QP info field {key!r} must be an int in 0..{top}, "
                                f"got {v!r}")
    if not isinstance(info.get("gid"), str) or len(info["gid"]) > 64:
        raise ProtocolError(f"rdma: QP info field 'gid' must be a string, got {info.get('gid')!r}")
    return info


READY = b"R"  # receiver -> sender once its receives are posted (side channel, set-up only)


def exchange_info(sock: socket.socket, mine: dict) -> dict:
    """Swap one QP info line each way over the (blocking) side-channel socket."""
    try:
        sock.sendall(encode_info(mine))
        buf = b""
        while not buf.endswith(b"\n"):
            # byte by byte: the receiver's READY byte may follow the line at once (set-up only)
            chunk = sock.recv(1)
            if not chunk:
                raise PeerLost("rdma: peer closed the side channel during the QP info exchange")
            buf += chunk
            if len(buf) > MAX_INFO_BYTES:
                raise ProtocolError("rdma: QP info line is too long")
    except TimeoutError:
        raise PeerLost("rdma: no QP info from the peer in time") from None
    except OSError as exc:
        raise PeerLost(f"rdma: side channel failed during the QP info exchange: {exc}") from None
    return decode_info(buf)


def _default_factory() -> QpFactory:
    device = pick_device()  # TransportUnavailable without a device
    return lambda mem, depth: QueuePair(device, mem, depth)


class RdmaReceiver(StreamReceiver):
    """``rdma://HOST:PORT`` receiver; see the module docstring.

    ``qp_factory`` builds each link's queue pair (default: pyverbs on the chosen device).
    """

    data_on_socket = False
    slot_header = HEADER_SIZE

    def __init__(self, ep: Endpoint, config: ReceiverConfig,
                 qp_factory: QpFactory | None = None) -> None:
        self._qp_factory = qp_factory or _default_factory()
        super().__init__(ep, config)

    def _listen(self, ep: Endpoint) -> tuple[socket.socket, str]:
        sock, port = listen_tcp(ep)
        return sock, Endpoint("rdma", ep.host, port).url

    def _make_memory(self, sender_id: int, size: int) -> tuple[mmap.mmap, list[int]]:
        return mmap.mmap(-1, size), []

    def _connected(self, peer: _Peer) -> None:
        nslots = len(peer.slots.busy)
        try:
            qp = self._qp_factory(peer.mem, nslots)
        except Exception as exc:  # noqa: BLE001 - verbs errors of any kind refuse this link
            raise ProtocolError(f"rdma: cannot create a queue pair: {exc}") from None
        try:
            remote = exchange_info(peer.sock, qp.local_info())
            qp.connect(remote)
            qp.post_recv(nslots)  # one receive per slot: at most nslots writes are in flight
            qp.notify()
            # Only now may the sender write: a WRITE_WITH_IMM that lands before its receive is
            # posted fails (RNR) or burns retries.
            peer.sock.sendall(READY)
        except BaseException:
            qp.close()
            raise
        peer.ext = qp
        peer.extra_fds = [qp.event_fd]

    def _read(self, peer: _Peer, fd: int) -> None:
        if fd == peer.fd:  # side channel: CLOSE (a DATA frame there is a protocol error)
            self._read_headers(peer)
            return
        qp = peer.ext
        qp.take_event()
        qp.notify()  # re-arm first, then poll: a completion racing in still raises an event
        stride = HEADER_SIZE + peer.capacity
        nslots = len(peer.slots.busy)
        while completions := qp.poll():  # until empty: re-arming does not re-signal these
            for c in completions:
                if not c.ok:
                    raise PeerLost(f"rdma: receive completion failed: {c.error}")
                if not c.recv:
                    continue
                slot, seq_bits = unpack_imm(c.imm)
                if slot >= nslots:
                    raise ProtocolError(f"rdma write into slot {slot} (receiver granted "
                                        f"{nslots})")
                off = slot * stride
                f = unpack_fields(peer.view[off:off + HEADER_SIZE])
                check_imm(new_header(f), slot, seq_bits)
                validate_fields(f, sender_id=peer.sender_id, nslots=nslots,
                                slot_capacity=peer.capacity)
                qp.post_recv(1)
                if not self._on_header(peer, f, in_slot=True):
                    return

    def _forget(self, peer: _Peer) -> None:
        if peer.ext is not None:
            peer.ext.close()
            peer.ext = None


class RdmaSender(StreamSender):
    """Sender to an ``rdma://HOST:PORT`` receiver; see the module docstring."""

    def __init__(self, ep: Endpoint, config: SenderConfig,
                 qp_factory: QpFactory | None = None) -> None:
        self._qp_factory = qp_factory or _default_factory()
        self._qp = None
        super().__init__(ep, config)

    def _connect_once(self, ep: Endpoint) -> socket.socket:
        return connect_tcp(ep, self.config.connect_timeout_s)

    def _attach(self, fds: list[int]) -> None:
        stride = HEADER_SIZE + self.slot_bytes
        self._mem = mmap.mmap(-1, self.nslots * stride)  # staging: header + payload per slot
        try:
            qp = self._qp_factory(self._mem, self.nslots)
        except Exception as exc:  # noqa: BLE001
            raise PeerLost(f"rdma: cannot create a queue pair: {exc}") from None
        try:
            remote = exchange_info(self._sock, qp.local_info())
            if remote["size"] < self.nslots * stride:
                raise ProtocolError(f"rdma: receiver memory of {remote['size']} bytes is smaller "
                                    f"than {self.nslots} slots of {stride}")
            qp.connect(remote)
            if self._sock.recv(1) != READY:
                raise PeerLost("rdma: receiver closed the side channel before it was ready")
        except BaseException:
            qp.close()
            raise
        self._qp = qp

    def _write(self, slot: int, seq: int, meta: tuple, data: Any) -> None:
        header = pack_fields(Kind.DATA, self.sender_id, self.epoch, slot, seq, *meta)
        off = slot_offset(slot, self.slot_bytes)
        end = off + HEADER_SIZE + meta[META_NBYTES]
        mem = self._mem
        mem[off:off + HEADER_SIZE] = header
        mem[off + HEADER_SIZE:end] = data  # the one copy (into registered memory)
        for c in self._qp.poll():  # reap earlier writes' completions (errors = peer gone)
            if not c.ok:
                raise OSError(f"rdma: write completion failed: {c.error}")
        self._qp.write_imm(off, end - off, off, pack_imm(slot, seq))

    def _detach(self) -> None:
        if self._qp is not None:
            self._qp.close()
            self._qp = None
        mem = getattr(self, "_mem", None)
        if mem is not None:
            try:
                mem.close()
            except BufferError:
                pass
