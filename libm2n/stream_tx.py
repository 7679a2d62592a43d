"""Sender end of the shm/tcp stream transports (see :mod:`libm2n.stream` for the frames)."""

from __future__ import annotations

import select
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any

from libm2n.api import Endpoint, Sender, SenderConfig, as_payload
from libm2n.credits import CreditPool, PendingSend
from libm2n.errors import CreditTimeout, InvalidArgument, M2NError, PeerLost, ProtocolError
from libm2n.header import HEADER_SIZE, Header, Kind, pack, unpack, validate
from libm2n.stream import (
    Eof,
    close_fd,
    error_from_frame,
    read_exact,
    shutdown_quietly,
)

_TICK_S = 0.1  # reader thread wake-up period for deadline checks
_ZERO_TRACE = b"\0" * 16
_ZERO_SPAN = b"\0" * 8


class StreamSender(Sender):
    """Sender over a stream socket; subclasses provide connect, welcome and the slot write."""

    def __init__(self, ep: Endpoint, config: SenderConfig) -> None:
        self.config = config
        self.sender_id = config.sender_id
        self.url = ep.url
        self._lock = threading.Lock()
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

    def _write(self, header: bytes, slot: int, data: memoryview) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        pass

    # -- public --------------------------------------------------------------------------------
    def send(self, payload: Any, *, step: int = 0, layer: int = 0, micro_batch: int = 0,
             tag: int = 0, trace_id: bytes | None = None,
             span_id: bytes | None = None) -> Future:
        data, rows, cols, dtype = as_payload(payload)
        if len(data) > self.slot_bytes:
            raise InvalidArgument(f"payload of {len(data)} bytes exceeds the slot size "
                                  f"{self.slot_bytes} of {self.url}")
        trace_id = _ZERO_TRACE if trace_id is None else bytes(trace_id)
        span_id = _ZERO_SPAN if span_id is None else bytes(span_id)
        if len(trace_id) != 16 or len(span_id) != 8:
            raise InvalidArgument("trace_id must be 16 bytes and span_id 8 bytes")
        meta = dict(step=step, layer=layer, micro_batch=micro_batch, tag=tag, rows=rows,
                    cols=cols, dtype=dtype, trace_id=trace_id, span_id=span_id)
        fut: Future = Future()
        with self._lock:
            self._raise_if_failed()
            got = self._pool.take()
            if got is None:
                self._stats["queued"] += 1
                deadline = time.monotonic() + self.config.peer_timeout_s
                self._pool.pending.append(PendingSend(meta, data, fut, deadline))
                return fut
            self._write_locked(meta, data, *got)
        fut.set_result(None)
        return fut

    def flush(self, timeout: float | None = None) -> None:
        with self._lock:
            futs = [p.future for p in self._pool.pending]
        end = None if timeout is None else time.monotonic() + timeout
        for f in futs:
            f.result(None if end is None else max(0.0, end - time.monotonic()))

    def outstanding(self) -> int:
        """Messages written but not yet released by the receiver, plus queued ones."""
        with self._lock:
            return self._pool.outstanding() + len(self._pool.pending)

    def stats(self) -> dict[str, int]:
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
            sock.sendall(pack(Header(kind=Kind.HELLO, sender_id=cfg.sender_id, epoch=cfg.epoch)))
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
            self._attach(fds)
        except Eof:
            raise PeerLost(f"{self.url} closed the connection during the handshake") from None
        finally:
            for fd in fds:
                close_fd(fd)
        sock.settimeout(None)

    def _write_locked(self, meta: dict[str, Any], data: memoryview, slot: int, seq: int) -> None:
        hdr = pack(Header(kind=Kind.DATA, sender_id=self.sender_id, epoch=self.config.epoch,
                          slot=slot, seq=seq, payload_bytes=len(data), **meta))
        try:
            self._write(hdr, slot, data)
        except OSError as exc:
            err = PeerLost(f"receiver {self.url} is gone: {exc}")
            self._fail_locked(err)
            raise PeerLost(str(err)) from None
        self._stats["messages"] += 1
        self._stats["bytes"] += len(data)

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

    def _read_loop(self) -> None:
        sock = self._sock
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        buf = bytearray(HEADER_SIZE)
        hview = memoryview(buf)
        tick_ms = int(min(_TICK_S, self.config.peer_timeout_s / 4) * 1000) or 1
        while not self._closed:
            try:
                events = poller.poll(tick_ms)
                if not events:
                    with self._lock:
                        expired = self._pool.expired()
                    if expired:
                        self._fail(CreditTimeout(
                            f"no credit from {self.url} within {self.config.peer_timeout_s}s; "
                            "treating the receiver as lost"))
                        return
                    continue
                read_exact(sock, hview)
                h = unpack(buf)
                validate(h, sender_id=self.sender_id, nslots=self.nslots,
                         slot_capacity=self.slot_bytes)
                if h.kind == Kind.CREDIT:
                    self._on_credit(h.slot)
                elif h.kind == Kind.ERROR:
                    text = bytearray(h.payload_bytes)
                    read_exact(sock, memoryview(text))
                    self._fail(error_from_frame(h, text.decode(errors="replace")))
                    return
                elif h.kind == Kind.CLOSE:
                    self._fail(PeerLost(f"receiver {self.url} closed"))
                    return
                else:
                    raise ProtocolError(f"unexpected {Kind(h.kind).name} frame from a receiver")
            except Eof:
                self._fail(PeerLost(f"receiver {self.url} closed the connection"))
                return
            except (PeerLost, OSError) as exc:
                self._fail(PeerLost(f"receiver {self.url} is gone: {exc}"))
                return
            except ProtocolError as exc:
                self._fail(exc)
                return

    def _on_credit(self, slot: int) -> None:
        done: list[Future] = []
        with self._lock:
            self._pool.grant(slot)
            for p, s, seq in self._pool.ready():
                try:
                    self._write_locked(p.meta, p.data, s, seq)
                except PeerLost as exc:
                    p.future.set_exception(exc)
                    return
                done.append(p.future)
        for f in done:
            f.set_result(None)


