"""The transport-neutral libm2n API: endpoints, configs, messages, completions.

Model
-----
A :class:`Receiver` listens on an endpoint URL (``shm://NAME``, ``tcp://HOST:PORT``,
``rdma://HOST:PORT`` whose HOST:PORT is the tcp side channel). Every :class:`Sender` that
connects gets its own pool of ``slots_per_sender`` fixed-size slots on the receiver and starts
with one credit per slot.
``Sender.send`` puts one message (a fixed 128-byte :mod:`~libm2n.header` + raw payload bytes) into a
slot it holds a credit for and signals the receiver; ``Receiver.recv``/``poll`` hand back a
:class:`Message` whose payload is a **view of the slot** (zero copies out). ``Message.release``
frees the slot and sends the credit back. A process that both dispatches and combines simply
owns one Receiver and one Sender per peer.

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
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from libm2n import fastpath
from libm2n.errors import InvalidArgument
from libm2n.header import F_COLS, F_DTYPE, F_PAYLOAD_BYTES, F_ROWS, DType, Header, fields_of

SCHEMES = ("shm", "tcp", "rdma")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint URL. For shm ``host`` is the NAME and ``port`` is 0."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        if self.scheme == "shm":
            return f"shm://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """Parse ``shm://NAME``, ``tcp://HOST:PORT`` or ``rdma://HOST:PORT``.

    Raises InvalidArgument naming the problem.
    """
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgument(f"bad m2n endpoint {url!r}: expected shm://NAME, tcp://HOST:PORT "
                              "or rdma://HOST:PORT")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise InvalidArgument(f"bad m2n endpoint {url!r}: unknown scheme {scheme!r} "
                              f"(expected one of {', '.join(SCHEMES)})")
    rest = url.split("://", 1)[1]
    if scheme == "shm":
        if not _NAME_RE.match(rest):
            raise InvalidArgument(f"bad m2n endpoint {url!r}: shm name must be 1-80 characters "
                                  "of [A-Za-z0-9_.-]")
        return Endpoint("shm", rest, 0)
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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        if not isinstance(self.sender_id, int) or not 0 <= self.sender_id <= 2**32 - 1:
            raise InvalidArgument(f"sender_id must be an int in 0..2**32-1, got {self.sender_id!r}")
        if not isinstance(self.epoch, int) or not 0 <= self.epoch <= 2**64 - 1:
            raise InvalidArgument(f"epoch must be an int in 0..2**64-1, got {self.epoch!r}")
        if not self.peer_timeout_s > 0:
            raise InvalidArgument(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
        if not self.connect_timeout_s > 0:
            raise InvalidArgument(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")


_TORCH_CODES: dict[str, int] = {
    "torch.uint8": DType.UINT8, "torch.int8": DType.INT8, "torch.int16": DType.INT16,
    "torch.int32": DType.INT32, "torch.int64": DType.INT64, "torch.float16": DType.FLOAT16,
    "torch.bfloat16": DType.BFLOAT16, "torch.float32": DType.FLOAT32,
    "torch.float64": DType.FLOAT64, "torch.bool": DType.BOOL,
}
_TORCH_CODES_BY_NAME = tuple((k.removeprefix("torch."), v) for k, v in _TORCH_CODES.items())
_NUMPY_CODES: dict[str, int] = {
    "uint8": DType.UINT8, "int8": DType.INT8, "int16": DType.INT16, "int32": DType.INT32,
    "int64": DType.INT64, "float16": DType.FLOAT16, "float32": DType.FLOAT32,
    "float64": DType.FLOAT64, "bool": DType.BOOL,
}


_DTYPE_CACHE: dict[Any, int | None] = {}  # torch/numpy dtype object -> code (None: refused)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, shape[-1]


def as_payload(obj: Any) -> tuple[memoryview, int, int, int]:
    """Return ``(bytes view, rows, cols, dtype code)`` for a tensor, ndarray or bytes-like.

    A torch tensor of shape ``(..., C)`` travels as ``rows = prod(...)``, ``cols = C``; bytes
    travel as uint8 ``1 x len``. CUDA tensors are staged through pinned host memory (one
    device-to-host copy). Non-contiguous inputs are made contiguous (one extra copy).
    """
    mod = type(obj).__module__
    if mod.startswith("torch"):
        import torch

        if not isinstance(obj, torch.Tensor):
            raise InvalidArgument(f"cannot send a {type(obj).__name__}")
        code = _DTYPE_CACHE.get(obj.dtype)
        if code is None:
            code = _TORCH_CODES.get(str(obj.dtype))
            _DTYPE_CACHE[obj.dtype] = code
        if code is None:
            raise InvalidArgument(f"cannot send a tensor of dtype {obj.dtype}")
        t = obj.detach()
        if t.device.type != "cpu":
            # Stage through pinned host memory so the device->host copy is a DMA.
            staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            staged.copy_(t)
            t = staged
        t = t.contiguous()
        rows, cols = _rows_cols(tuple(t.shape))
        flat = t.reshape(-1)
        view = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
        return view.cast("B") if view.ndim == 1 else view, rows, cols, code
    if mod.startswith("numpy"):
        import numpy as np

        if not isinstance(obj, np.ndarray):
            raise InvalidArgument(f"cannot send a {type(obj).__name__}")
        code = _DTYPE_CACHE.get(obj.dtype)
        if code is None:
            code = _NUMPY_CODES.get(str(obj.dtype))  # str(dtype) is slow: once per dtype
            _DTYPE_CACHE[obj.dtype] = code
        if code is None:
            raise InvalidArgument(f"cannot send an array of dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj)
        rows, cols = _rows_cols(arr.shape)
        return memoryview(arr.reshape(-1).view(np.uint8)), rows, cols, code
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgument(f"cannot send a {type(obj).__name__}: expected a torch tensor, "
                              "numpy array or bytes-like") from None
    if not view.contiguous:
        raise InvalidArgument("cannot send a non-contiguous buffer")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return view, 1, len(view), DType.UINT8


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
        dtype = getattr(torch, _CODE_TORCH[f[F_DTYPE]])
        if f[F_PAYLOAD_BYTES] == 0:
            return torch.empty((f[F_ROWS], f[F_COLS]), dtype=dtype)
        return torch.frombuffer(self.payload, dtype=dtype).view(f[F_ROWS], f[F_COLS])

    def numpy(self):  # noqa: ANN201
        """The payload as a ``(rows, cols)`` numpy array aliasing the slot (not for bfloat16)."""
        import numpy as np

        f = self.fields
        name = _CODE_TORCH[f[F_DTYPE]]
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


_CODE_TORCH: dict[int, str] = {
    DType.UINT8: "uint8", DType.INT8: "int8", DType.INT16: "int16", DType.INT32: "int32",
    DType.INT64: "int64", DType.FLOAT16: "float16", DType.BFLOAT16: "bfloat16",
    DType.FLOAT32: "float32", DType.FLOAT64: "float64", DType.BOOL: "bool",
}


class Receiver:
    """Abstract receiver; see the module docstring. Implementations: shm, tcp, rdma."""

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


def open_receiver(url: str, config: ReceiverConfig | None = None) -> Receiver:
    """Listen on ``url`` (tcp port 0 picks a free port; read the real one from ``.url``)."""
    ep = parse_url(url)
    config = config or ReceiverConfig()
    if ep.scheme == "shm":
        from libm2n.shm import ShmReceiver

        return ShmReceiver(ep, config)
    if ep.scheme == "tcp":
        from libm2n.tcp import TcpReceiver

        return TcpReceiver(ep, config)
    from libm2n.rdma import RdmaReceiver

    return RdmaReceiver(ep, config)


def connect(url: str, config: SenderConfig) -> Sender:
    """Connect a sender to the receiver at ``url`` (retries until ``connect_timeout_s``)."""
    ep = parse_url(url)
    if ep.scheme == "shm":
        from libm2n.shm import ShmSender

        return ShmSender(ep, config)
    if ep.scheme == "tcp":
        from libm2n.tcp import TcpSender

        return TcpSender(ep, config)
    from libm2n.rdma import RdmaSender

    return RdmaSender(ep, config)
