"""The transport-neutral libm2n interface: endpoints, configs, messages, receivers, senders.

Every transport (:mod:`libm2n.shm`, :mod:`libm2n.tcp`, :mod:`libm2n.rdma`) implements
:class:`Receiver` and :class:`Sender` from here; this module imports no transport. The schemes
come from the data-only :mod:`libm2n.registry`, and :func:`libm2n.open_receiver` /
:func:`libm2n.connect` pick the transport from it.

Model
-----
A :class:`Receiver` listens on an endpoint URL (``shm://NAME``, ``tcp://HOST:PORT``,
``rdma://HOST:PORT`` whose HOST:PORT is the tcp side channel). Every :class:`Sender` that
connects gets its own pool of ``slots_per_sender`` fixed-size slots on the receiver and starts
with one credit per slot.
``Sender.send`` puts one message (a fixed 128-byte :mod:`~libm2n.header` + raw payload bytes, see
:func:`libm2n.payload.as_payload`) into a slot it holds a credit for and signals the receiver;
``Receiver.recv``/``poll`` hand back a :class:`Message` whose payload is a **view of the slot**
(zero copies out). ``Message.release`` frees the slot and sends the credit back. A process that
both dispatches and combines simply owns one Receiver and one Sender per peer.

Lifetime rule
-------------
``Message.payload`` / ``Message.tensor()`` / ``Message.numpy()`` alias receiver slot memory.
They are valid until ``Message.release()`` (or the end of ``with msg:``); after that the sender
may overwrite the slot at any moment. Copy (``msg.tensor().clone()``) anything you keep longer.
A message that is never released keeps its credit, so the sender eventually stalls and fails
with :class:`~libm2n.errors.CreditTimeout` after ``peer_timeout_s``.

On the send side the payload object must stay alive and unmodified until the returned
completion (a :class:`concurrent.futures.Future`) is done; when a credit is available the copy
happens inside ``send`` and the completion is already done on return.

Threads and asyncio
-------------------
Every object is thread-safe. Receivers deliver through an internal queue: ``recv(timeout)``
blocks without burning a core, ``poll()`` never blocks, ``arecv()`` awaits from asyncio.
Completions are ``concurrent.futures.Future`` objects (``await asyncio.wrap_future(f)``). A send
written at once returns a shared, already-done completion (no per-message Future).
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from libm2n import fastpath
from libm2n.errors import InvalidArgument, M2NError
from libm2n.header import F_COLS, F_DTYPE, F_PAYLOAD_BYTES, F_ROWS, Header, fields_of
from libm2n.payload import CODE_NAMES
from libm2n.registry import SCHEMES, TRANSPORTS

__all__ = ["Endpoint", "Message", "Receiver", "ReceiverConfig", "Sender", "SenderConfig",
           "parse_url"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")
_NAMED = frozenset(s for s, t in TRANSPORTS.items() if t.named)  # SCHEME://NAME, not HOST:PORT


def _address_forms() -> str:
    """``"shm://NAME, tcp://HOST:PORT or rdma://HOST:PORT"`` (for error messages)."""
    forms = [f"{s}://NAME" if s in _NAMED else f"{s}://HOST:PORT" for s in SCHEMES]
    return f"{', '.join(forms[:-1])} or {forms[-1]}" if len(forms) > 1 else forms[0]


_FORMS = _address_forms()


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint URL. For a named scheme (shm) ``host`` is the NAME and ``port`` is 0."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        if self.scheme in _NAMED:
            return f"{self.scheme}://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """Parse ``shm://NAME``, ``tcp://HOST:PORT`` or ``rdma://HOST:PORT``.

    The schemes and their address forms are :data:`libm2n.registry.TRANSPORTS`. Raises
    InvalidArgument naming the problem.
    """
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgument(f"bad m2n endpoint {url!r}: expected {_FORMS}")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise InvalidArgument(f"bad m2n endpoint {url!r}: unknown scheme {scheme!r} "
                              f"(expected one of {', '.join(SCHEMES)})")
    rest = url.split("://", 1)[1]
    if scheme in _NAMED:
        if not _NAME_RE.match(rest):
            raise InvalidArgument(f"bad m2n endpoint {url!r}: {scheme} name must be 1-80 "
                                  "characters of [A-Za-z0-9_.-]")
        return Endpoint(scheme, rest, 0)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise InvalidArgument(f"bad m2n endpoint {url!r}: {exc}") from None
    if not host or port is None or parts.path not in ("", "/") or parts.query:
        raise InvalidArgument(f"bad m2n endpoint {url!r}: expected {scheme}://HOST:PORT")
    return Endpoint(scheme, host, port)


@dataclass(frozen=True)
class ReceiverConfig:
    """Receiver knobs. Memory per connected sender is ``slots_per_sender * slot_bytes``."""

    slots_per_sender: int = 4
    slot_bytes: int = 1 << 20  # payload capacity of one slot
    max_senders: int = 256
    handshake_timeout_s: float = 5.0  # a connection that does not say HELLO in time is dropped
    # recv() polls without sleeping for up to this many microseconds before it blocks: a reply
    # that comes back within the spin skips a scheduler wake-up. Bounded, so an idle receiver
    # still costs ~0 CPU; 0 disables it. The spin yields the core between polls, so with more
    # processes than cores it does not starve the peer it waits for. 100 us measured better
    # than 0 at 1x1, 2x2 and 4x4 on 2 cores (bench/m2n.py, shm 256 KB: p50 one-way 35 -> 27,
    # 129 -> 105, 465 -> 423 us); 200 us was no better than 100.
    spin_us: float = 100.0
    # When set, a sender must prove it holds this shared token in its HELLO (libm2n.auth);
    # others are refused before any slot memory is allocated for them.
    auth_token: bytes | None = field(default=None, repr=False)
    # What any set of peers can take. Connections in their handshake at once: each holds one
    # short-lived thread; more wait in the listen backlog, and one address's connections past
    # max_handshakes_per_host are closed at once (tcp). Slot memory over all admitted
    # senders: a sender past it is refused before its slots are allocated (0 = no bound but
    # max_senders times the per-sender size).
    max_handshakes: int = 64
    max_handshakes_per_host: int = 16
    max_slot_memory_bytes: int = 0

    def __post_init__(self) -> None:
        _check_token(self.auth_token)
        if not 1 <= self.max_handshakes_per_host <= self.max_handshakes <= 4096:
            raise InvalidArgument(
                f"need 1 <= max_handshakes_per_host <= max_handshakes <= 4096, got "
                f"{self.max_handshakes_per_host} and {self.max_handshakes}")
        if self.max_slot_memory_bytes < 0:
            raise InvalidArgument(
                f"max_slot_memory_bytes must be >= 0, got {self.max_slot_memory_bytes}")
        if not 1 <= self.slots_per_sender <= 4096:
            raise InvalidArgument(
                f"slots_per_sender must be in 1..4096, got {self.slots_per_sender}")
        if not 1 <= self.slot_bytes <= 2**32 - 1:
            raise InvalidArgument(f"slot_bytes must be in 1..2**32-1, got {self.slot_bytes}")
        if not 1 <= self.max_senders <= 65536:
            raise InvalidArgument(f"max_senders must be in 1..65536, got {self.max_senders}")
        if not self.handshake_timeout_s > 0:
            raise InvalidArgument(
                f"handshake_timeout_s must be > 0, got {self.handshake_timeout_s}")
        if not 0 <= self.spin_us <= 1_000_000:
            raise InvalidArgument(f"spin_us must be in 0..1000000, got {self.spin_us}")


def _check_token(token: bytes | None) -> None:
    if token is not None and (not isinstance(token, bytes) or len(token) < 16):
        raise InvalidArgument("auth_token must be bytes of at least 16 bytes")


@dataclass(frozen=True)
class SenderConfig:
    """Sender knobs.

    ``peer_timeout_s`` bounds how long a send may wait for a credit: past it the receiver is
    declared lost and every pending completion fails with CreditTimeout. A receiver that dies is
    noticed at once on shm/tcp (the socket reports EOF/reset).
    """

    sender_id: int
    epoch: int = 0
    peer_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0  # how long to retry while the receiver is not up yet
    auth_token: bytes | None = field(default=None, repr=False)  # see ReceiverConfig

    def __post_init__(self) -> None:
        _check_token(self.auth_token)
        if not isinstance(self.sender_id, int) or not 0 <= self.sender_id <= 2**32 - 1:
            raise InvalidArgument(f"sender_id must be an int in 0..2**32-1, got {self.sender_id!r}")
        if not isinstance(self.epoch, int) or not 0 <= self.epoch <= 2**64 - 1:
            raise InvalidArgument(f"epoch must be an int in 0..2**64-1, got {self.epoch!r}")
        if not self.peer_timeout_s > 0:
            raise InvalidArgument(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
        if not self.connect_timeout_s > 0:
            raise InvalidArgument(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")


class Message:
    """One received message: ``sender_id``, ``header`` and ``payload`` (a view of the slot).

    See the module docstring for the lifetime rule; use as a context manager or call
    :meth:`release` exactly once (extra calls are ignored). ``fields`` is the header as the
    receiver parsed it (a tuple in :data:`libm2n.header.FIELDS` order); ``header``, the
    :class:`~libm2n.header.Header` object, is built from it on first use (most consumers only
    read the payload).
    """

    __slots__ = ("sender_id", "payload", "fields", "_header", "_release", "_released")

    def __init__(self, header: Header | tuple, payload: memoryview, release) -> None:  # noqa: ANN001
        # ``header``: a Header, or a fields tuple in libm2n.header.FIELDS order (hot path)
        if isinstance(header, Header):
            self._header = header
            header = fields_of(header)
        else:
            self._header = None
        self.fields = header
        self.sender_id = header[1]
        self.payload = payload
        self._release = release
        self._released = False

    @property
    def header(self) -> Header:
        h = self._header
        if h is None:
            h = self._header = fastpath.new_header(self.fields)
        return h

    def tensor(self):  # noqa: ANN201 - torch is imported lazily
        """The payload as a ``(rows, cols)`` torch tensor aliasing the slot (no copy)."""
        import torch

        f = self.fields
        dtype = getattr(torch, CODE_NAMES[f[F_DTYPE]])
        if f[F_PAYLOAD_BYTES] == 0:
            return torch.empty((f[F_ROWS], f[F_COLS]), dtype=dtype)
        return torch.frombuffer(self.payload, dtype=dtype).view(f[F_ROWS], f[F_COLS])

    def numpy(self):  # noqa: ANN201
        """The payload as a ``(rows, cols)`` numpy array aliasing the slot (not for bfloat16)."""
        import numpy as np

        f = self.fields
        name = CODE_NAMES[f[F_DTYPE]]
        if name == "bfloat16":
            raise InvalidArgument("numpy has no bfloat16; use Message.tensor()")
        return np.frombuffer(self.payload, dtype=name).reshape(f[F_ROWS], f[F_COLS])

    def release(self) -> None:
        """Return the slot to the sender (sends a CREDIT frame). Idempotent."""
        if not self._released:
            self._released = True
            self._release(self)

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        h = self.header
        return (f"Message(sender={h.sender_id}, seq={h.seq}, step={h.step}, layer={h.layer}, "
                f"mb={h.micro_batch}, tag={h.tag}, shape=({h.rows}, {h.cols}), "
                f"bytes={h.payload_bytes})")


class Receiver:
    """Abstract receiver; see the module docstring. The implementations: :mod:`libm2n.registry`."""

    url: str

    def recv(self, timeout: float | None = None) -> Message:
        """Block up to ``timeout`` seconds (None = forever) for a message; TimeoutError if none."""
        raise NotImplementedError

    def poll(self) -> Message | None:
        """Return a ready message or None, never blocking."""
        raise NotImplementedError

    async def arecv(self, timeout: float | None = None) -> Message:
        """asyncio flavour of :meth:`recv` (waits in a worker thread)."""
        msg = self.poll()
        if msg is not None:
            return msg
        return await asyncio.to_thread(self.recv, timeout)

    def peers(self) -> list[int]:
        """Sender ids currently connected."""
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """Plain counters (messages, bytes, errors, peers_connected, peers_lost, ...)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sender:
    """Abstract sender bound to one receiver; see the module docstring."""

    url: str
    sender_id: int
    nslots: int
    slot_bytes: int

    def send(self, payload: Any, *, step: int = 0, layer: int = 0, micro_batch: int = 0,
             tag: int = 0, trace_id: bytes | None = None,
             span_id: bytes | None = None) -> Future:
        """Queue one message; returns a completion that is done once the payload is in a slot.

        Raises PeerLost (or a ProtocolError the receiver reported) if the peer is already known
        to be gone, and InvalidArgument for a payload larger than the slot or of a bad type.
        """
        raise NotImplementedError

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued send has been written (raises what a failed send raised)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise the error that broke this link, if any (never blocks)."""
        raise NotImplementedError

    def healthy(self) -> bool:
        """Whether the link is unbroken: :meth:`check` as a bool (never blocks)."""
        try:
            self.check()
        except M2NError:
            return False
        return True

    def set_epoch(self, epoch: int) -> None:
        """Stamp ``epoch`` (a placement epoch) into every later message's header."""
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
