"""Receiver end of the shm/tcp stream transports (see :mod:`libm2n.stream` for the frames).

Progress model: an acceptor thread takes connections and runs each handshake in a short-lived
thread; an admitted connection is made non-blocking and joins one epoll set. Frames are then read
**by the thread that calls** ``recv``/``poll`` (one at a time, under a lock): it waits in
``epoll_wait`` (no CPU while idle), reads every ready connection through a small per-connection
state machine (header, then for tcp the payload straight into the slot) and returns the first
complete message. No thread hand-off sits on the hot path. Consequence: bad frames, disconnects
and CLOSE frames are handled while the owner calls ``recv``/``poll`` (engines poll constantly).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
import time
from collections import deque

from libm2n.auth import check_hello_tag
from libm2n.base import Endpoint, Message, Receiver, ReceiverConfig
from libm2n.credits import SlotTable
from libm2n.errors import M2NError, PeerLost, ProtocolError
from libm2n.fastpath import check, read_headers
from libm2n.header import (
    F_KIND,
    F_PAYLOAD_BYTES,
    F_SEQ,
    F_SLOT,
    HEADER_SIZE,
    Header,
    Kind,
    pack,
    unpack,
    validate,
)
from libm2n.stream import (
    Eof,
    Refused,
    close_fd,
    credit_frame,
    error_frame,
    read_exact,
    send_all_nb,
    shutdown_quietly,
)

_REUSE_GRACE_S = 1.0  # how long a HELLO waits for its sender id's old connection to go
_MAX_FRAMES_PER_WAKEUP = 64  # per connection, so one busy sender cannot starve the others
_HEADER_BATCH = _MAX_FRAMES_PER_WAKEUP * HEADER_SIZE  # shm: bytes read per recv_into
_DATA = int(Kind.DATA)  # a plain int compares faster than the enum member


def _peer_host(sock: socket.socket) -> str:
    """The peer's address ("" for a unix socket: every shm sender is local)."""
    try:
        addr = sock.getpeername()
    except OSError:
        return ""
    return addr[0] if isinstance(addr, tuple) else ""


class _Peer:
    """Receiver-side state of one connected sender, including its read state machine."""

    __slots__ = ("sock", "fd", "sender_id", "mem", "view", "slots", "capacity", "lock", "alive",
                 "owner", "hbuf", "hview", "got", "header", "pview", "pgot", "credits",
                 "extra_fds", "ext", "credits_sent")

    def __init__(self, sock: socket.socket, sender_id: int, mem: mmap.mmap, nslots: int,
                 capacity: int, owner: StreamReceiver) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.sender_id = sender_id
        self.mem = mem
        self.view = memoryview(mem)
        self.slots = SlotTable(nslots)
        self.capacity = capacity
        self.lock = threading.Lock()  # guards slots, alive and writes to sock
        self.alive = True
        self.owner = owner
        # shm reads many headers per recv_into; tcp one at a time (the payload follows it).
        self.hbuf = bytearray(HEADER_SIZE if owner.streams_payload else _HEADER_BATCH)
        self.hview = memoryview(self.hbuf)
        self.got = 0  # header bytes read so far
        self.header: tuple | None = None  # fields of the DATA frame whose payload is in flight
        self.pview: memoryview | None = None
        self.pgot = 0
        self.credits = [credit_frame(sender_id, i) for i in range(nslots)]
        self.extra_fds: list[int] = []  # more fds to watch for this peer (rdma: its CQ events)
        self.ext = None  # transport-specific state (rdma: the queue pair)
        self.credits_sent = 0  # under self.lock; folded into the receiver's stats on drop

    def release(self, msg: Message) -> None:
        """Free the message's slot and send the CREDIT back (silently if the peer is gone)."""
        slot = msg.fields[F_SLOT]
        with self.lock:
            if not self.slots.free(slot):
                return
            if not self.alive:
                self.maybe_unmap()
                return
            try:
                send_all_nb(self.sock, self.credits[slot])
            except OSError:
                return  # the next recv/poll notices the dead peer
            self.credits_sent += 1

    def maybe_unmap(self) -> None:
        if self.slots.in_use == 0:
            try:
                self.view.release()
                self.mem.close()
            except BufferError:
                pass  # a caller still holds a view (e.g. a tensor); the GC unmaps later


class StreamReceiver(Receiver):
    """Receiver over a listening stream socket; subclasses provide the socket and slot memory."""

    streams_payload = False  # tcp: the payload follows the header on the socket
    data_on_socket = True  # rdma: DATA arrives through the CQ, the socket is control only
    slot_header = 0  # bytes before each slot's payload (rdma: the 128-byte header lives there)

    def __init__(self, ep: Endpoint, config: ReceiverConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # peers, stats
        self._rlock = threading.Lock()  # one reader of the epoll set at a time
        self._peers: dict[int, _Peer | None] = {}
        self._by_fd: dict[int, _Peer] = {}
        self._ready: deque[Message] = deque()
        self._spin_s = config.spin_us * 1e-6
        self._closed = False
        self._stats = dict(messages=0, bytes=0, errors=0, peers_connected=0, peers_lost=0,
                           peers_closed=0, credits_sent=0, refused_unauthenticated=0,
                           refused_busy=0, refused_memory=0)
        # Connections in their handshake, per peer address (each holds a handshake thread).
        self._handshaking: dict[str, int] = {}
        self._slot_memory = 0  # bytes of slot memory held by admitted and admitting senders
        self._handshake_slots = threading.BoundedSemaphore(config.max_handshakes)
        self._listener, self.url = self._listen(ep)
        self._listener.settimeout(0.2)
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"m2n-accept-{self.url}")
        self._acceptor.start()

    # -- hooks ---------------------------------------------------------------------------------
    def _listen(self, ep: Endpoint) -> tuple[socket.socket, str]:
        raise NotImplementedError

    def _make_memory(self, sender_id: int, size: int) -> tuple[mmap.mmap, list[int]]:
        """Slot memory for one sender and the fds to pass to it (closed after the WELCOME)."""
        raise NotImplementedError

    def _send_welcome(self, sock: socket.socket, frame: bytes, fds: list[int]) -> None:
        sock.sendall(frame)

    def _connected(self, peer: _Peer) -> None:
        """After the WELCOME, still in the handshake thread with a blocking socket: set up
        anything more the transport needs (rdma: swap QP info). Raise ProtocolError/OSError."""

    def _read(self, peer: _Peer, fd: int) -> None:
        """Read what arrived on ``fd`` of ``peer`` without blocking (BlockingIOError: drained)."""
        if self.streams_payload:
            self._read_stream(peer)
        else:
            self._read_headers(peer)

    def _forget(self, peer: _Peer) -> None:
        """``peer`` was dropped: free transport-specific state (called once)."""

    # -- public --------------------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._rlock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError(f"no message on {self.url} within {timeout}s")
        try:
            if not self._ready and self._spin_s > 0 and not self._closed:
                # Bounded busy poll before sleeping (see ReceiverConfig.spin_us).
                spin_end = time.perf_counter() + (self._spin_s if timeout is None
                                                  else min(self._spin_s, timeout))
                self._progress(0)
                while not self._ready and time.perf_counter() < spin_end:
                    # Give the core to any runnable process first (returns at once when none
                    # waits): with more processes than cores a plain spin starves the very peer
                    # whose reply it waits for (measured: 2x2 and 4x4 on 2 cores got slower).
                    os.sched_yield()
                    self._progress(0)
            while True:
                if self._ready:
                    return self._ready.popleft()
                if self._closed:
                    raise M2NError(f"receiver {self.url} is closed")
                if deadline is None:
                    wait = -1.0
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise TimeoutError(f"no message on {self.url} within {timeout}s")
                self._progress(wait)
        finally:
            self._rlock.release()

    def poll(self) -> Message | None:
        if not self._rlock.acquire(blocking=False):
            return None
        try:
            if not self._ready:
                if self._closed:
                    raise M2NError(f"receiver {self.url} is closed")
                self._progress(0)
            return self._ready.popleft() if self._ready else None
        finally:
            self._rlock.release()

    def peers(self) -> list[int]:
        with self._lock:
            return sorted(k for k, v in self._peers.items() if v is not None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            live = [v for v in self._peers.values() if v is not None]
            out["peers_connected"] = len(live)
            out["credits_sent"] += sum(p.credits_sent for p in live)
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            os.write(self._wake_w, b"x")  # wake a recv blocked in epoll_wait
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        self._acceptor.join(timeout=2.0)
        for t in list(self._threads):
            t.join(timeout=2.0)
        got = self._rlock.acquire(timeout=5.0)
        try:
            with self._lock:
                peers = [p for p in self._peers.values() if p is not None]
            for p in peers:
                with p.lock:
                    if p.alive:
                        try:
                            send_all_nb(p.sock, pack(Header(kind=Kind.CLOSE,
                                                            sender_id=p.sender_id)), 0.5)
                        except OSError:
                            pass
                self._drop(p, graceful=True, count=False)
            self._epoll.close()
            close_fd(self._wake_r)
            close_fd(self._wake_w)
        finally:
            if got:
                self._rlock.release()

    # -- internals -----------------------------------------------------------------------------
    def _peer_bytes(self) -> int:
        """Slot memory of one sender."""
        return self.config.slots_per_sender * (self.slot_header + self.config.slot_bytes)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _accept_loop(self) -> None:
        while not self._closed:
            # Bounded threads: past max_handshakes connections wait in the listen backlog
            # until a handshake ends (each ends within handshake_timeout_s).
            if not self._handshake_slots.acquire(timeout=0.2):
                continue
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                self._handshake_slots.release()
                continue
            except OSError:
                self._handshake_slots.release()
                if self._closed:
                    return
                time.sleep(0.01)
                continue
            host = _peer_host(sock)
            with self._lock:
                # One address may not hold every handshake slot with idle connections: past
                # its share, its new connections are closed at once. (Unix sockets: local.)
                busy = bool(host) and (self._handshaking.get(host, 0)
                                       >= self.config.max_handshakes_per_host)
                if busy:
                    self._stats["refused_busy"] += 1
                else:
                    self._handshaking[host] = self._handshaking.get(host, 0) + 1
            if busy:
                self._handshake_slots.release()
                shutdown_quietly(sock)
                sock.close()
                continue
            t = threading.Thread(target=self._admit, args=(sock, host), daemon=True,
                                 name=f"m2n-handshake-{self.url}")
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _admit(self, sock: socket.socket, host: str) -> None:
        """Handshake one connection (in its own short-lived thread), then join the epoll set."""
        try:
            self._admit_handshaken(sock)
        finally:
            self._handshake_slots.release()
            with self._lock:
                left = self._handshaking.get(host, 1) - 1
                if left:
                    self._handshaking[host] = left
                else:
                    self._handshaking.pop(host, None)

    def _admit_handshaken(self, sock: socket.socket) -> None:
        try:
            peer = self._handshake(sock)
        except (Eof, PeerLost, OSError):
            shutdown_quietly(sock)
            sock.close()
            return
        except ProtocolError as exc:
            self._count("errors")
            try:
                sock.settimeout(1.0)
                sock.sendall(error_frame(exc))
            except OSError:
                pass
            shutdown_quietly(sock)
            sock.close()
            return
        sock.setblocking(False)
        with self._lock:
            if self._closed:
                self._peers.pop(peer.sender_id, None)
                self._slot_memory -= self._peer_bytes()
                shutdown_quietly(sock)
                sock.close()
                return
            self._peers[peer.sender_id] = peer
            for fd in (peer.fd, *peer.extra_fds):
                self._by_fd[fd] = peer
                self._epoll.register(fd, select.EPOLLIN)

    def _handshake(self, sock: socket.socket) -> _Peer:
        sock.settimeout(self.config.handshake_timeout_s)
        buf = bytearray(HEADER_SIZE)
        try:
            read_exact(sock, memoryview(buf))
        except TimeoutError:
            raise ProtocolError("no HELLO within the handshake timeout") from None
        h = unpack(buf)
        if h.kind != Kind.HELLO:
            raise ProtocolError(f"expected HELLO, got {Kind(h.kind).name}")
        validate(h, sender_id=None, nslots=0, slot_capacity=0)
        tag = bytearray(h.payload_bytes)
        if tag:
            read_exact(sock, memoryview(tag))
        cfg = self.config
        if cfg.auth_token is not None and not check_hello_tag(cfg.auth_token, h.sender_id,
                                                               bytes(tag)):
            self._count("refused_unauthenticated")
            raise Refused(f"sender {h.sender_id} failed authentication (no or wrong cluster "
                          "token)")
        # A sender that reconnects right after closing (a restart) finds its id still taken
        # until a reader has processed the old connection's CLOSE/EOF: wait for that (reading
        # ourselves when no one else is) a little before refusing the id as a duplicate.
        grace_end = time.monotonic() + min(cfg.handshake_timeout_s, _REUSE_GRACE_S)
        size = self._peer_bytes()
        while True:
            with self._lock:
                if self._closed:
                    raise Refused("receiver is closing")
                if h.sender_id not in self._peers:
                    if len(self._peers) >= cfg.max_senders:
                        raise Refused(f"{self.url} is full ({cfg.max_senders} senders)")
                    if cfg.max_slot_memory_bytes and (self._slot_memory + size
                                                      > cfg.max_slot_memory_bytes):
                        self._stats["refused_memory"] += 1
                        raise Refused(f"{self.url} is full (slot memory "
                                      f"{cfg.max_slot_memory_bytes} bytes)")
                    self._peers[h.sender_id] = None  # reserve the id until the WELCOME is out
                    self._slot_memory += size
                    break
            if time.monotonic() >= grace_end:
                raise Refused(f"sender id {h.sender_id} is already connected to {self.url}")
            if self._rlock.acquire(blocking=False):
                # Nobody is reading (an idle owner): read the pending frames ourselves, so the
                # old connection's CLOSE/EOF is seen; messages found wait in _ready as usual.
                try:
                    if not self._closed:
                        self._progress(0)
                finally:
                    self._rlock.release()
            time.sleep(0.005)
        try:
            mem, fds = self._make_memory(h.sender_id, size)
            peer = _Peer(sock, h.sender_id, mem, cfg.slots_per_sender, cfg.slot_bytes, self)
            welcome = pack(Header(kind=Kind.WELCOME, sender_id=h.sender_id,
                                  rows=cfg.slots_per_sender, cols=cfg.slot_bytes))
            try:
                self._send_welcome(sock, welcome, fds)
            finally:
                for fd in fds:
                    close_fd(fd)
            self._connected(peer)
        except BaseException:
            with self._lock:
                self._peers.pop(h.sender_id, None)
                self._slot_memory -= size
            raise
        return peer

    def _progress(self, wait: float) -> None:
        """Wait up to ``wait`` seconds (-1: forever) for readable connections and read them."""
        try:
            events = self._epoll.poll(wait)
        except InterruptedError:
            return
        except (OSError, ValueError):
            if self._closed:
                return
            raise
        for fd, _ev in events:
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
                continue
            peer = self._by_fd.get(fd)
            if peer is not None:
                self._service(peer, fd)

    def _service(self, peer: _Peer, fd: int) -> None:
        """Read what ``peer`` has sent, without blocking; complete messages go to ``_ready``."""
        try:
            self._read(peer, fd)
        except BlockingIOError:
            return
        except (Eof, PeerLost, OSError):
            self._drop(peer, graceful=False)
        except ProtocolError as exc:
            self._count("errors")
            with peer.lock:
                try:
                    send_all_nb(peer.sock, error_frame(exc, peer.sender_id), 1.0)
                except OSError:
                    pass
            self._drop(peer, graceful=False)

    def _read_headers(self, peer: _Peer) -> None:
        """shm: the socket carries headers only, so one read takes every waiting frame (up to
        :data:`_HEADER_BATCH` bytes; ``fastpath.read_headers`` reads and checks them in one
        call); a short read means the socket is drained, which saves the second, failing read
        per wake-up. Good frames before a bad one are still acted on, then the error raises."""
        got = read_headers(peer.fd, peer.hbuf, peer.got, peer.sender_id, len(peer.slots.busy),
                           peer.capacity)
        if got is None:
            if peer.got:
                raise PeerLost("connection closed in the middle of a header")
            raise Eof()
        peer.got, frames, err = got
        for f in frames:
            if not self._on_header(peer, f):
                return
        if err is not None:
            raise err

    def _read_stream(self, peer: _Peer) -> None:
        """tcp: header, then the payload ``recv_into`` its slot (a small state machine)."""
        sock = peer.sock
        for _ in range(_MAX_FRAMES_PER_WAKEUP):
            if peer.pview is None:
                n = sock.recv_into(peer.hview[peer.got:], HEADER_SIZE - peer.got)
                if n == 0:
                    if peer.got:
                        raise PeerLost("connection closed in the middle of a header")
                    raise Eof()
                peer.got += n
                if peer.got < HEADER_SIZE:
                    continue
                peer.got = 0
                f = check(peer.hbuf, 0, peer.sender_id, len(peer.slots.busy), peer.capacity)
                if not self._on_header(peer, f):
                    return
            else:
                n = sock.recv_into(peer.pview[peer.pgot:], len(peer.pview) - peer.pgot)
                if n == 0:
                    raise PeerLost("connection closed in the middle of a payload")
                peer.pgot += n
                if peer.pgot == len(peer.pview):
                    h, view = peer.header, peer.pview
                    peer.header, peer.pview = None, None
                    self._deliver(peer, h, view)

    def _on_header(self, peer: _Peer, f: tuple, in_slot: bool = False) -> bool:
        """Act on one header, already validated (a fields tuple, :data:`header.FIELDS` order);
        False once the peer is gone (CLOSE).

        ``in_slot``: the header was read from slot memory (rdma), not from the socket."""
        kind = f[F_KIND]
        if kind == _DATA and (in_slot or self.data_on_socket):
            slot, nbytes = f[F_SLOT], f[F_PAYLOAD_BYTES]
            with peer.lock:
                peer.slots.occupy(slot, f[F_SEQ])
            off = slot * (self.slot_header + peer.capacity) + self.slot_header
            view = peer.view[off:off + nbytes]
            if self.streams_payload and nbytes:
                peer.header, peer.pview, peer.pgot = f, view, 0
            else:
                self._deliver(peer, f, view)
            return True
        if kind == Kind.CLOSE and not in_slot:
            self._drop(peer, graceful=True)
            return False
        raise ProtocolError(f"unexpected {Kind(kind).name} frame from a sender")

    def _deliver(self, peer: _Peer, f: tuple, view: memoryview) -> None:
        # No lock: only the reader (the _rlock holder) writes these two counters.
        stats = self._stats
        stats["messages"] += 1
        stats["bytes"] += f[F_PAYLOAD_BYTES]
        self._ready.append(Message(f, view, peer.release))

    def _drop(self, peer: _Peer, graceful: bool, count: bool = True) -> None:
        with self._lock:
            for fd in (peer.fd, *peer.extra_fds):
                if self._by_fd.get(fd) is peer:
                    del self._by_fd[fd]
                    try:
                        self._epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass
            if self._peers.get(peer.sender_id) is peer:
                del self._peers[peer.sender_id]
                self._slot_memory -= self._peer_bytes()
            if count:
                self._stats["peers_closed" if graceful else "peers_lost"] += 1
        with peer.lock:
            if not peer.alive:
                return
            peer.alive = False
            with self._lock:
                self._stats["credits_sent"] += peer.credits_sent
                peer.credits_sent = 0
            self._forget(peer)
            peer.maybe_unmap()
            shutdown_quietly(peer.sock)
            peer.sock.close()
