"""Same-host transport: slots in shared memory, one copy in, zero copies out.

Connection set-up (documented contract):

* ``shm://NAME`` is a Linux *abstract* unix stream socket ``"\\0m2n-NAME"``: no file on disk, it
  vanishes when the receiver dies, and it is scoped to the network namespace.
* On HELLO the receiver creates the sender's slot memory with ``memfd_create("m2n-NAME-<id>")``
  (``slots_per_sender * slot_bytes`` bytes), maps it, and passes the fd with the WELCOME frame
  (``socket.send_fds``); both sides close the fd once mapped. Nothing ever appears in /dev/shm,
  so a SIGKILLed process leaks nothing: the kernel frees the memory with the last mapping.
  Where memfd_create is missing, a ``/dev/shm/m2n-<pid>-...`` file is created and unlinked
  before its fd is passed; :func:`cleanup_stale_segments` removes any such file whose creating
  pid is dead (only possible if a process dies inside that microsecond window).
* Data: the sender copies the payload into the slot, then sends the 128-byte DATA header on the
  socket; that write is the notification (the receiver's reader thread sleeps in ``recv``, so an
  idle receiver burns no CPU). The socket also carries CREDIT frames back and reports peer death
  as EOF immediately.
"""

from __future__ import annotations

import mmap
import os
import socket
from typing import Any

from libm2n.base import Endpoint
from libm2n.errors import InvalidArgument, ProtocolError
from libm2n.fastpath import shm_send
from libm2n.header import Kind
from libm2n.stream import Eof, read_exact
from libm2n.stream_rx import StreamReceiver
from libm2n.stream_tx import StreamSender

SEGMENT_PREFIX = "m2n-"
_DATA = int(Kind.DATA)
_SHM_DIR = "/dev/shm"


def socket_address(name: str) -> str:
    """The abstract unix socket address of ``shm://name``."""
    return "\0" + SEGMENT_PREFIX + name


def _create_segment(label: str, size: int) -> int:
    """Return an fd of ``size`` bytes of shared memory that has no name in /dev/shm."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(SEGMENT_PREFIX + label, os.MFD_CLOEXEC)
    else:  # pragma: no cover - Linux always has memfd_create on Python >= 3.8
        path = os.path.join(_SHM_DIR, f"{SEGMENT_PREFIX}{os.getpid()}-{label}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def cleanup_stale_segments(prefix: str = SEGMENT_PREFIX, directory: str = _SHM_DIR) -> list[str]:
    """Remove ``directory/prefix<pid>-*`` files whose creating pid is no longer alive.

    Returns the removed paths. Files whose name carries no pid, or a live pid, are kept.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        except OSError:
            pass
    return removed


class ShmReceiver(StreamReceiver):
    """``shm://NAME`` receiver; see the module docstring."""

    def _listen(self, ep: Endpoint) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(socket_address(ep.host))
        except OSError as exc:
            sock.close()
            raise InvalidArgument(f"cannot listen on {ep.url}: {exc.strerror or exc}") from None
        sock.listen(128)
        self._name = ep.host
        return sock, ep.url

    def _make_memory(self, sender_id: int, size: int) -> tuple[mmap.mmap, list[int]]:
        fd = _create_segment(f"{self._name}-{sender_id}", size)
        try:
            return mmap.mmap(fd, size), [fd]
        except BaseException:
            os.close(fd)
            raise

    def _send_welcome(self, sock: socket.socket, frame: bytes, fds: list[int]) -> None:
        socket.send_fds(sock, [frame], fds)


class ShmSender(StreamSender):
    """Sender to an ``shm://NAME`` receiver; see the module docstring."""

    def _connect_once(self, ep: Endpoint) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_address(ep.host))
        except OSError:
            sock.close()
            raise
        return sock

    def _recv_welcome(self) -> tuple[bytes, list[int]]:
        frame, fds, _flags, _addr = socket.recv_fds(self._sock, 128, 4)
        if not frame:
            for fd in fds:
                os.close(fd)
            raise Eof()
        if len(frame) < 128:
            rest = bytearray(128 - len(frame))
            read_exact(self._sock, memoryview(rest))
            frame += bytes(rest)
        return frame, list(fds)

    def _attach(self, fds: list[int]) -> None:
        size = self.nslots * self.slot_bytes
        if len(fds) != 1:
            raise ProtocolError(f"WELCOME from {self.url} carried {len(fds)} fds, expected 1")
        if os.fstat(fds[0]).st_size < size:
            raise ProtocolError(f"shared segment from {self.url} is smaller than its slots")
        self._mem = mmap.mmap(fds[0], size)
        self._view = memoryview(self._mem)
        self._fd = self._sock.fileno()

    def _write(self, slot: int, seq: int, meta: tuple, data: Any) -> None:
        # the one copy in, then the header on the socket is the notification (C: one call)
        rest = shm_send(self._fd, self._view, slot * self.slot_bytes, data, _DATA,
                        self.sender_id, self.epoch, slot, seq, *meta)
        if rest:  # the socket buffer was full (or the pure-Python path): finish blocking
            self._sock.sendall(rest)

    def _detach(self) -> None:
        view = getattr(self, "_view", None)
        if view is not None:
            try:
                view.release()
                self._mem.close()
            except BufferError:
                pass
