"""An in-process stand-in for :class:`libm2n.rdma_verbs.QueuePair` (test code, not a mock of
libm2n): it stands in for the NIC. ``write_imm`` copies the bytes into the peer queue pair's
memory and posts a receive completion carrying the immediate on the peer's CQ, whose event fd is
a pipe; so the real :mod:`libm2n.rdma` receiver/sender code runs end to end without a device.
RC semantics kept: a write with no receive posted, or outside the peer's memory, fails with an
error completion on the sender (as RNR / remote access errors would)."""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections import deque

from libm2n.rdma_verbs import Completion

_REGISTRY: dict[int, LoopbackQP] = {}
_QPN = itertools.count(1)


class LoopbackQP:
    def __init__(self, mem: mmap.mmap, depth: int) -> None:
        self.view = memoryview(mem)
        self.qpn = next(_QPN)
        self.event_fd, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._cq: deque[Completion] = deque()
        self._lock = threading.Lock()
        self._armed = False
        self.recvs = 0
        self.remote: dict | None = None
        self.writes = 0
        _REGISTRY[self.qpn] = self

    def local_info(self) -> dict:
        return {"qpn": self.qpn, "psn": 0, "gid": "::1", "lid": 0, "rkey": self.qpn,
                "addr": 0, "size": len(self.view)}

    def connect(self, remote: dict) -> None:
        self.remote = remote

    def post_recv(self, n: int = 1) -> None:
        with self._lock:
            self.recvs += n

    def write_imm(self, offset: int, length: int, remote_offset: int, imm: int) -> None:
        peer = _REGISTRY.get(self.remote["qpn"]) if self.remote else None
        if peer is None:
            self._push(Completion(recv=False, ok=False, error="peer queue pair is gone"))
            return
        if remote_offset + length > len(peer.view) or offset + length > len(self.view):
            self._push(Completion(recv=False, ok=False, error="remote access error"))
            return
        with peer._lock:
            if peer.recvs == 0:
                ok = False
            else:
                peer.recvs -= 1
                ok = True
        if not ok:
            self._push(Completion(recv=False, ok=False, error="receiver not ready (RNR)"))
            return
        peer.view[remote_offset:remote_offset + length] = self.view[offset:offset + length]
        self.writes += 1
        peer._push(Completion(recv=True, ok=True, imm=imm))
        self._push(Completion(recv=False, ok=True))

    def _push(self, c: Completion) -> None:
        with self._lock:
            self._cq.append(c)
            fire, self._armed = self._armed, False
        if fire:
            try:
                os.write(self._wake, b"x")
            except OSError:
                pass

    def notify(self) -> None:
        with self._lock:
            self._armed = True

    def take_event(self) -> None:
        try:
            os.read(self.event_fd, 4096)
        except BlockingIOError:
            pass

    def poll(self, n: int = 32) -> list[Completion]:
        with self._lock:
            return [self._cq.popleft() for _ in range(min(n, len(self._cq)))]

    def close(self) -> None:
        if _REGISTRY.pop(self.qpn, None) is None:
            return
        for fd in (self.event_fd, self._wake):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.view.release()
        except BufferError:  # a test still holds a numpy view of it
            pass
