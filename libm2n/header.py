"""The fixed, versioned binary header that starts every libm2n frame.

Wire layout (little endian, 128 bytes, ``struct`` format :data:`HEADER_FORMAT`)::

    off size field          meaning
      0   4  magic          b"M2N\\x01"-style constant :data:`MAGIC` (u32)
      4   2  version        :data:`VERSION`; any other value is refused ("version mismatch")
      6   2  kind           :class:`Kind` (DATA, CREDIT, ERROR, CLOSE, HELLO, WELCOME)
      8   8  epoch          membership epoch of the sender (opaque to libm2n)
     16   4  sender_id      id the sender announced in HELLO; must match on every frame
     20   4  slot           slot index the DATA frame occupies / the CREDIT returns
     24   8  seq            per-connection sequence number of DATA frames (0, 1, 2, ...)
     32   8  step           engine step (opaque)
     40   4  layer          layer index (opaque)
     44   4  micro_batch    micro-batch index (opaque)
     48   4  rows           payload rows   (HELLO/WELCOME: slot count)
     52   4  cols           payload cols   (WELCOME: slot payload capacity in bytes)
     56   2  dtype          :class:`DType` code of the payload
     58   2  reserved       must be 0
     60   4  (padding)      must be 0
     64   8  payload_bytes  rows * cols * itemsize(dtype) for DATA; message length for ERROR
     72   8  tag            user tag (e.g. message id matching a combine to its dispatch)
     80  16  trace_id       W3C trace id (16 raw bytes, zeros = none)
     96   8  span_id        W3C parent span id (8 raw bytes)
    104  24  (padding)      must be 0

Every field is checked by :func:`unpack` / :func:`validate`; a violation raises
:class:`~libm2n.errors.ProtocolError` (or :class:`~libm2n.errors.VersionMismatch`).
The hot path works on plain *fields tuples* (:data:`FIELDS` order) instead of :class:`Header`
objects: :func:`unpack_fields` / :func:`validate_fields` / :func:`pack_fields` here are the
reference implementations; :mod:`libm2n.fastpath` picks them or their C twins in ``_fast.c``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from libm2n.errors import ProtocolError, VersionMismatch

MAGIC = 0x314E324D  # b"M2N1" little endian
VERSION = 1
HEADER_FORMAT = "<IHHQIIQQIIIIHHIQQ16s8s24x"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
_STRUCT = struct.Struct(HEADER_FORMAT)
assert HEADER_SIZE == 128, HEADER_SIZE
# The same layout with the trailing padding as a field, so unpack checks it without a slice copy.
_STRUCT_TAIL = struct.Struct(HEADER_FORMAT[:-3] + "24s")
_ZERO_TAIL = bytes(24)

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
MAX_ERROR_BYTES = 4096  # ERROR frames carry a utf-8 message of at most this many bytes
HELLO_TAG_BYTES = 32  # a HELLO carries nothing, or the sender's authentication tag (libm2n.auth)


class Kind(enum.IntEnum):
    DATA = 1
    CREDIT = 2
    ERROR = 3
    CLOSE = 4
    HELLO = 5  # sender -> receiver: announces sender_id/epoch/version
    WELCOME = 6  # receiver -> sender: rows = slot count, cols = slot payload capacity


class DType(enum.IntEnum):
    UINT8 = 1
    INT8 = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    FLOAT16 = 6
    BFLOAT16 = 7
    FLOAT32 = 8
    FLOAT64 = 9
    BOOL = 10


ITEMSIZE: dict[int, int] = {
    DType.UINT8: 1,
    DType.INT8: 1,
    DType.INT16: 2,
    DType.INT32: 4,
    DType.INT64: 8,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.FLOAT32: 4,
    DType.FLOAT64: 8,
    DType.BOOL: 1,
}
_KINDS = frozenset(int(k) for k in Kind)


@dataclass(frozen=True, slots=True)
class Header:
    """One decoded header. Construct with keywords; :func:`pack` checks ranges."""

    kind: int
    sender_id: int = 0
    epoch: int = 0
    slot: int = 0
    seq: int = 0
    step: int = 0
    layer: int = 0
    micro_batch: int = 0
    rows: int = 0
    cols: int = 0
    dtype: int = DType.UINT8
    payload_bytes: int = 0
    tag: int = 0
    trace_id: bytes = b"\0" * 16
    span_id: bytes = b"\0" * 8
    version: int = VERSION
    magic: int = MAGIC


# A frozen dataclass __init__ costs ~17 object.__setattr__ calls (the costliest step of a
# receive); filling the slots through their descriptors builds the same object ~2x faster.
_HEADER_SETTERS = tuple(Header.__dict__[f].__set__ for f in Header.__dataclass_fields__)


def new_header(values: tuple) -> Header:
    """A :class:`Header` from all its fields in declaration order (already range-checked)."""
    h = object.__new__(Header)
    for setter, value in zip(_HEADER_SETTERS, values, strict=True):
        setter(h, value)
    return h


def pack(h: Header) -> bytes:
    """Encode ``h``; raises ProtocolError if a field does not fit its wire width."""
    try:
        return _STRUCT.pack(
            h.magic, h.version, h.kind, h.epoch, h.sender_id, h.slot, h.seq, h.step, h.layer,
            h.micro_batch, h.rows, h.cols, h.dtype, 0, 0, h.payload_bytes, h.tag,
            h.trace_id, h.span_id,
        )
    except struct.error as exc:
        raise ProtocolError(f"header field out of range: {exc}") from None


def pack_fields(kind: int, sender_id: int, epoch: int, slot: int, seq: int, step: int,
                layer: int, micro_batch: int, rows: int, cols: int, dtype: int,
                payload_bytes: int, tag: int, trace_id: bytes, span_id: bytes) -> bytes:
    """:func:`pack` without building a :class:`Header` first (the per-message send path)."""
    try:
        return _STRUCT.pack(MAGIC, VERSION, kind, epoch, sender_id, slot, seq, step, layer,
                            micro_batch, rows, cols, dtype, 0, 0, payload_bytes, tag, trace_id,
                            span_id)
    except struct.error as exc:
        raise ProtocolError(f"header field out of range: {exc}") from None


def pack_into(buf, h: Header) -> None:  # noqa: ANN001 - any writable buffer
    """Encode ``h`` into ``buf[:HEADER_SIZE]`` (used for in-slot headers, e.g. rdma)."""
    buf[:HEADER_SIZE] = pack(h)


FIELDS = tuple(Header.__dataclass_fields__)  # the order of a "fields" tuple
# Index of each field in a fields tuple (the hot path reads tuples, not Header objects).
(F_KIND, F_SENDER_ID, F_EPOCH, F_SLOT, F_SEQ, F_STEP, F_LAYER, F_MICRO_BATCH, F_ROWS, F_COLS,
 F_DTYPE, F_PAYLOAD_BYTES, F_TAG, F_TRACE_ID, F_SPAN_ID, F_VERSION, F_MAGIC) = range(17)
assert FIELDS.index("payload_bytes") == F_PAYLOAD_BYTES and FIELDS.index("magic") == F_MAGIC


def fields_of(h: Header) -> tuple:
    """``h`` as a fields tuple (:data:`FIELDS` order, what :func:`unpack_fields` returns)."""
    return tuple(getattr(h, f) for f in FIELDS)


def unpack_fields(data) -> tuple:  # noqa: ANN001 - bytes-like of exactly HEADER_SIZE
    """Decode and check magic, version, kind and padding; returns the 17 fields in
    :data:`FIELDS` order (the reference for :mod:`libm2n._fast`'s ``unpack``)."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"short header: {len(data)} bytes, expected {HEADER_SIZE}")
    (magic, version, kind, epoch, sender_id, slot, seq, step, layer, micro_batch, rows, cols,
     dtype, reserved, pad, payload_bytes, tag, trace_id, span_id, tail) = _STRUCT_TAIL.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}")
    if version != VERSION:
        raise VersionMismatch(
            f"version mismatch: peer speaks header v{version}, we speak v{VERSION}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if reserved or pad or tail != _ZERO_TAIL:
        raise ProtocolError("reserved header bytes are not zero")
    return (kind, sender_id, epoch, slot, seq, step, layer, micro_batch, rows, cols, dtype,
            payload_bytes, tag, trace_id, span_id, version, magic)


def unpack(data) -> Header:  # noqa: ANN001 - bytes-like of exactly HEADER_SIZE
    """Decode and check magic, version, kind and padding; see :func:`validate` for the rest."""
    return new_header(unpack_fields(data))


def validate(h: Header, *, sender_id: int | None, nslots: int, slot_capacity: int) -> None:
    """Check a frame against its connection: sender id, slot range, dtype and sizes.

    ``slot_capacity`` is the payload capacity of one slot in bytes. Raises ProtocolError.
    """
    _validate(h.kind, h.sender_id, h.slot, h.rows, h.cols, h.dtype, h.payload_bytes,
              sender_id, nslots, slot_capacity)


def validate_fields(f: tuple, *, sender_id: int | None, nslots: int, slot_capacity: int) -> None:
    """:func:`validate` of a fields tuple (the reference for :mod:`libm2n._fast`'s ``check``)."""
    _validate(f[F_KIND], f[F_SENDER_ID], f[F_SLOT], f[F_ROWS], f[F_COLS], f[F_DTYPE],
              f[F_PAYLOAD_BYTES], sender_id, nslots, slot_capacity)


def _validate(kind: int, frame_sender: int, slot: int, rows: int, cols: int, dtype: int,
              payload_bytes: int, sender_id: int | None, nslots: int,
              slot_capacity: int) -> None:
    if sender_id is not None and frame_sender != sender_id:
        raise ProtocolError(f"sender id {frame_sender} on a connection opened by {sender_id}")
    if kind == Kind.DATA:
        itemsize = ITEMSIZE.get(dtype)
        if itemsize is None:
            raise ProtocolError(f"unknown dtype code {dtype}")
        if slot >= nslots:
            raise ProtocolError(f"slot {slot} out of range (receiver granted {nslots})")
        if rows * cols * itemsize != payload_bytes:
            raise ProtocolError(
                f"rows*cols*itemsize = {rows}*{cols}*{itemsize} != payload_bytes "
                f"{payload_bytes}"
            )
        if payload_bytes > slot_capacity:
            raise ProtocolError(
                f"payload of {payload_bytes} bytes exceeds the slot size {slot_capacity}"
            )
    elif kind == Kind.CREDIT:
        if slot >= nslots:
            raise ProtocolError(f"credit for slot {slot} out of range ({nslots} slots)")
    elif kind == Kind.ERROR:
        if payload_bytes > MAX_ERROR_BYTES:
            raise ProtocolError(f"error message of {payload_bytes} bytes is too long")
    elif kind == Kind.HELLO:
        if payload_bytes not in (0, HELLO_TAG_BYTES):
            raise ProtocolError(f"HELLO frame with payload_bytes {payload_bytes}")
    elif payload_bytes != 0:
        raise ProtocolError(f"{Kind(kind).name} frame with payload_bytes {payload_bytes}")
