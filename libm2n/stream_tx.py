"""Sender end of the shm/tcp stream transports (see :mod:`libm2n.stream` for the frames).

Progress model (why there is no thread wake-up per message): CREDIT/ERROR/CLOSE frames from the
receiver are read **inline** by whichever call takes the lock next (``send``, ``check``,
``outstanding``, ``stats``, ``flush``) with a non-blocking drain of the socket. The reader thread
sleeps on a condition variable and only watches the socket while sends are queued for want of a
credit (it writes them as credits arrive and enforces ``peer_timeout_s``). In the common case a
credit is already waiting when the next ``send`` comes, so a message costs one copy plus one
socket write, and no GIL hand-off between threads. A dead receiver is noticed by the next call
(the drain reads EOF/reset) or at once by the reader thread while sends are queued.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any

from libm2n.auth import hello_tag
from libm2n.base import Endpoint, Sender, SenderConfig
from libm2n.credits import CreditPool, PendingSend
from libm2n.errors import CreditTimeout, InvalidArgument, M2NError, PeerLost, ProtocolError
from libm2n.fastpath import payload as fast_payload
from libm2n.header import HEADER_SIZE, Header, Kind, pack, unpack, validate
from libm2n.stream import (
    Eof,
    close_fd,
    credit_frame,
    error_from_frame,
    read_exact,
    shutdown_quietly,
)

_TICK_S = 0.1  # reader thread wake-up period for deadline checks (only while sends queue)
_DRAIN_BYTES = 64 * HEADER_SIZE  # one non-blocking read takes up to 64 control frames
META_NBYTES = 6  # index of payload_bytes in a send's ``meta`` tuple (step ... span_id)
_ZERO_TRACE = b"\0" * 16
_ZERO_SPAN = b"\0" * 8


class StreamSender(Sender):
    """Sender over a stream socket; subclasses provide connect, welcome and the slot write."""

    def __init__(self, ep: Endpoint, config: SenderConfig) -> None:
        self.config = config
        self.sender_id = config.sender_id
        self.epoch = config.epoch  # stamped into DATA headers; moved by set_epoch
        self.url = ep.url
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # wakes the reader when a send is queued
        self._rbuf = bytearray()  # receiver->sender bytes not yet parsed into whole frames
        self._draining = False  # a drain is in progress (a failed write inside it must not nest)
        self._error: M2NError | None = None
        self._closed = False
        self._stats = dict(messages=0, bytes=0, queued=0)
        self._sock = self._connect_retry(ep)
        try:
            self._handshake()
        except BaseException:
            self._sock.close()
            raise
        self._pool = CreditPool(self.nslots)
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"m2n-credits-{self.url}")
        self._reader.start()

    # -- hooks ---------------------------------------------------------------------------------
    def _connect_once(self, ep: Endpoint) -> socket.socket:
        raise NotImplementedError

    def _recv_welcome(self) -> tuple[bytes, list[int]]:
        buf = bytearray(HEADER_SIZE)
        read_exact(self._sock, memoryview(buf))
        return bytes(buf), []

    def _attach(self, fds: list[int]) -> None:
        """Map the slot memory (shm); tcp has nothing to do."""

    def _write(self, slot: int, seq: int, meta: tuple, data: Any) -> None:
        """Put one DATA frame into ``slot`` and signal it. ``meta``: the header fields after
        ``seq`` in :func:`~libm2n.fastpath.pack_fields` order (step ... span_id; payload_bytes
        at :data:`META_NBYTES`); ``data`` exports exactly that many bytes. OSError: the link
        broke."""
        raise NotImplementedError

    def _detach(self) -> None:
        pass

    # -- public --------------------------------------------------------------------------------
    def send(self, payload: Any, *, step: int = 0, layer: int = 0, micro_batch: int = 0,
             tag: int = 0, trace_id: bytes | None = None,
             span_id: bytes | None = None) -> Future:
        data, nbytes, rows, cols, dtype = fast_payload(payload)
        if nbytes > self.slot_bytes:
            raise InvalidArgument(f"payload of {nbytes} bytes exceeds the slot size "
                                  f"{self.slot_bytes} of {self.url}")
        trace_id = _ZERO_TRACE if trace_id is None else bytes(trace_id)
        span_id = _ZERO_SPAN if span_id is None else bytes(span_id)
        if len(trace_id) != 16 or len(span_id) != 8:
            raise InvalidArgument("trace_id must be 16 bytes and span_id 8 bytes")
        # Header fields in pack_fields order after (kind, sender_id, epoch, slot, seq).
        meta = (step, layer, micro_batch, rows, cols, dtype, nbytes, tag, trace_id, span_id)
        fut = _DONE  # written inside send: a shared, already-finished completion
        with self._lock:
            done: list[Future] = []
            err = self._error
            got = None if err is not None else self._pool.take()
            if got is None and err is None:
                # Out of credits: read the ones that came back since the last call. (With a
                # credit in hand the drain is skipped: a failed write drains to learn why.)
                done = self._drain_locked()
                err = self._error
                got = None if err is not None else self._pool.take()
            if err is None:
                if got is None:
                    fut = Future()
                    self._stats["queued"] += 1
                    deadline = time.monotonic() + self.config.peer_timeout_s
                    self._pool.pending.append(PendingSend(meta, data, fut, deadline))
                    self._cv.notify()  # the reader thread now watches for credits
                else:
                    try:
                        self._write_locked(meta, data, *got)
                    except M2NError as exc:
                        err = exc
        if done:
            _complete(done)  # outside the lock: set_result runs the futures' callbacks
        if err is not None:
            raise type(err)(str(err))
        return fut

    def flush(self, timeout: float | None = None) -> None:
        self._progress()
        with self._lock:
            futs = [p.future for p in self._pool.pending]
        end = None if timeout is None else time.monotonic() + timeout
        for f in futs:
            f.result(None if end is None else max(0.0, end - time.monotonic()))

    def set_epoch(self, epoch: int) -> None:
        """Stamp ``epoch`` into every later message (a placement change at a step boundary
        keeps the link; only the header field moves)."""
        if not isinstance(epoch, int) or not 0 <= epoch <= 2**64 - 1:
            raise InvalidArgument(f"epoch must be an int in 0..2**64-1, got {epoch!r}")
        with self._lock:
            self.epoch = epoch

    def check(self) -> None:
        """Raise the error that broke this link (PeerLost, CreditTimeout, ProtocolError), if
        any; return at once otherwise. Cheap: callers poll it while waiting for replies."""
        self._progress()
        with self._lock:
            self._raise_if_failed()

    def outstanding(self) -> int:
        """Messages written but not yet released by the receiver, plus queued ones."""
        self._progress()
        with self._lock:
            return self._pool.outstanding() + len(self._pool.pending)

    def stats(self) -> dict[str, int]:
        self._progress()
        with self._lock:
            out = dict(self._stats)
            out["outstanding"] = self._pool.outstanding()
            out["pending"] = len(self._pool.pending)
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._error is None:
                try:
                    self._sock.sendall(pack(Header(kind=Kind.CLOSE, sender_id=self.sender_id)))
                except OSError:
                    pass
            self._fail_locked(PeerLost(f"sender to {self.url} was closed"))
            self._cv.notify_all()
        shutdown_quietly(self._sock)
        self._reader.join(timeout=2.0)
        self._sock.close()
        self._detach()

    # -- internals -----------------------------------------------------------------------------
    def _connect_retry(self, ep: Endpoint) -> socket.socket:
        deadline = time.monotonic() + self.config.connect_timeout_s
        delay = 0.005
        while True:
            try:
                return self._connect_once(ep)
            except (ConnectionRefusedError, FileNotFoundError, TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise PeerLost(f"cannot connect to {ep.url} within "
                                   f"{self.config.connect_timeout_s}s: {exc}") from None
            except OSError as exc:
                raise PeerLost(f"cannot connect to {ep.url}: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _handshake(self) -> None:
        sock = self._sock
        sock.settimeout(self.config.connect_timeout_s)
        cfg = self.config
        try:
            tag = b"" if cfg.auth_token is None else hello_tag(cfg.auth_token, cfg.sender_id)
            sock.sendall(pack(Header(kind=Kind.HELLO, sender_id=cfg.sender_id, epoch=cfg.epoch,
                                     payload_bytes=len(tag))) + tag)
            frame, fds = self._recv_welcome()
        except Eof:
            raise PeerLost(f"{self.url} closed the connection during the handshake") from None
        except (TimeoutError, OSError) as exc:
            raise PeerLost(f"handshake with {self.url} failed: {exc}") from None
        try:
            h = unpack(frame)
            if h.kind == Kind.ERROR:
                validate(h, sender_id=None, nslots=0, slot_capacity=0)
                text = bytearray(h.payload_bytes)
                read_exact(sock, memoryview(text))
                raise error_from_frame(h, text.decode(errors="replace"))
            if h.kind != Kind.WELCOME:
                raise ProtocolError(f"expected WELCOME from {self.url}, got {Kind(h.kind).name}")
            if h.rows < 1 or h.cols < 1:
                raise ProtocolError(f"WELCOME from {self.url} grants {h.rows} slots of {h.cols} B")
            self.nslots, self.slot_bytes = h.rows, h.cols
            self._credit_frames = {credit_frame(self.sender_id, i): i for i in range(h.rows)}
            self._attach(fds)
        except Eof:
            raise PeerLost(f"{self.url} closed the connection during the handshake") from None
        finally:
            for fd in fds:
                close_fd(fd)
        sock.settimeout(None)

    def _write_locked(self, meta: tuple, data: Any, slot: int, seq: int) -> None:
        try:
            self._write(slot, seq, meta, data)
        except OSError as exc:
            if not self._draining:
                self._drain_locked()  # an ERROR/CLOSE frame waiting there says why
            self._fail_locked(PeerLost(f"receiver {self.url} is gone: {exc}"))
            self._cv.notify_all()
            raise type(self._error)(str(self._error)) from None
        self._stats["messages"] += 1
        self._stats["bytes"] += meta[META_NBYTES]

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise type(self._error)(str(self._error))

    def _fail_locked(self, exc: M2NError) -> None:
        if self._error is None:
            self._error = exc
        while self._pool.pending:
            p = self._pool.pending.popleft()
            if not p.future.done():
                p.future.set_exception(type(exc)(str(exc)))

    def _fail(self, exc: M2NError) -> None:
        with self._lock:
            self._fail_locked(exc)
        shutdown_quietly(self._sock)

    def _progress(self) -> None:
        """Drain what the receiver sent so far (never blocks) and finish the sends it freed."""
        with self._lock:
            done = self._drain_locked()
        _complete(done)

    def _drain_locked(self) -> list[Future]:
        """Read and act on every whole frame waiting on the socket, without blocking.

        Returns the completions of queued sends that credits let us write; the caller sets them
        once it has dropped the lock. A dead or misbehaving receiver fails the link here.
        """
        if self._error is not None:
            return []
        done: list[Future] = []
        self._draining = True
        try:
            while True:
                try:
                    chunk = self._sock.recv(_DRAIN_BYTES, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    raise Eof()
                self._rbuf += chunk
                if len(chunk) < _DRAIN_BYTES:
                    break
            self._parse_locked(done)
        except Eof:
            self._fail_io_locked(PeerLost(f"receiver {self.url} closed the connection"))
        except (PeerLost, OSError) as exc:
            self._fail_io_locked(PeerLost(f"receiver {self.url} is gone: {exc}"))
        except ProtocolError as exc:
            self._fail_io_locked(exc)
        finally:
            self._draining = False
        return done

    def _parse_locked(self, done: list[Future]) -> None:
        buf = self._rbuf
        credits = self._credit_frames
        while len(buf) >= HEADER_SIZE:
            frame = bytes(buf[:HEADER_SIZE])
            slot = credits.get(frame)
            if slot is not None:  # fast path: a CREDIT is one of nslots known byte strings
                del buf[:HEADER_SIZE]
                self._grant_locked(slot, done)
                continue
            h = unpack(frame)
            validate(h, sender_id=self.sender_id, nslots=self.nslots,
                     slot_capacity=self.slot_bytes)
            if h.kind == Kind.CREDIT:
                del buf[:HEADER_SIZE]
                self._grant_locked(h.slot, done)
            elif h.kind == Kind.ERROR:
                if len(buf) < HEADER_SIZE + h.payload_bytes:
                    return  # the message text is still on its way
                text = bytes(buf[HEADER_SIZE:HEADER_SIZE + h.payload_bytes])
                raise error_from_frame(h, text.decode(errors="replace"))
            elif h.kind == Kind.CLOSE:
                raise PeerLost(f"receiver {self.url} closed")
            else:
                raise ProtocolError(f"unexpected {Kind(h.kind).name} frame from a receiver")

    def _grant_locked(self, slot: int, done: list[Future]) -> None:
        """Take back ``slot`` and write the queued sends it (and other free slots) allow."""
        self._pool.grant(slot)
        for p, s, seq in self._pool.ready():
            try:
                self._write_locked(p.meta, p.data, s, seq)
            except M2NError as exc:  # the link is failed; the rest get it from there
                p.future.set_exception(exc)
                raise
            done.append(p.future)

    def _fail_io_locked(self, exc: M2NError) -> None:
        self._fail_locked(exc)
        self._cv.notify_all()
        shutdown_quietly(self._sock)

    def _read_loop(self) -> None:
        """Sleep until a send is queued; then watch the socket and the deadline until the queue
        is empty again (so an unloaded link costs no thread wake-ups)."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        tick_ms = int(min(_TICK_S, self.config.peer_timeout_s / 4) * 1000) or 1
        while True:
            with self._lock:
                while not self._pool.pending and not self._closed and self._error is None:
                    self._cv.wait()
                if self._closed or self._error is not None:
                    return
            try:
                poller.poll(tick_ms)
            except OSError:
                pass  # the drain below reports what is wrong with the socket
            with self._lock:
                done = self._drain_locked()
                if self._error is None and self._pool.expired():
                    self._fail_io_locked(CreditTimeout(
                        f"no credit from {self.url} within {self.config.peer_timeout_s}s; "
                        "treating the receiver as lost"))
            _complete(done)


_DONE: Future = Future()
_DONE.set_result(None)


def _complete(futures: list[Future]) -> None:
    for f in futures:
        if not f.done():
            f.set_result(None)
