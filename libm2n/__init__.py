"""libm2n: the M-to-N activation transport (shm, tcp, rdma).

Quick use::

    rx = libm2n.open_receiver("shm://experts-0", libm2n.ReceiverConfig(slot_bytes=1 << 20))
    tx = libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=3))
    tx.send(tensor, step=7, layer=2, micro_batch=1, tag=42).result()
    with rx.recv(timeout=1.0) as msg:      # msg.tensor() aliases the slot until release
        out = expert_ffn(msg.tensor())

Modules, each importing only those above it:

* :mod:`libm2n.errors`, :mod:`libm2n.header`: exceptions; the 128-byte wire header.
* :mod:`libm2n.payload`: dtype codes and :func:`as_payload` (what a payload is on the wire).
* :mod:`libm2n.fastpath`: the per-message hot path, C (``libm2n._fast``) or pure Python.
* :mod:`libm2n.registry`: data only, every scheme's module, classes and address form.
* :mod:`libm2n.base`: the transport-neutral interface (Endpoint, configs, Message, Receiver,
  Sender) and its model, lifetime rule and threading contract.
* the transports: :mod:`libm2n.credits`, :mod:`libm2n.stream` (+ ``stream_rx``/``stream_tx``),
  :mod:`libm2n.shm`, :mod:`libm2n.tcp`, :mod:`libm2n.rdma_verbs`, :mod:`libm2n.rdma`.
* this package: the factory (:func:`open_receiver`, :func:`connect`), which imports a transport
  by its registry entry the first time its scheme is used, and the public names.

libm2n never imports ``services``; counters are plain ``stats()`` dicts.
"""

from __future__ import annotations

import importlib

from libm2n.base import (
    Endpoint,
    Message,
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    parse_url,
)
from libm2n.errors import (
    CreditTimeout,
    InvalidArgument,
    M2NError,
    PeerLost,
    ProtocolError,
    TransportUnavailable,
    VersionMismatch,
)
from libm2n.payload import as_payload
from libm2n.registry import TRANSPORTS
from libm2n.shm import cleanup_stale_segments

__all__ = [
    "CreditTimeout", "Endpoint", "InvalidArgument", "M2NError", "Message", "PeerLost",
    "ProtocolError", "Receiver", "ReceiverConfig", "Sender", "SenderConfig",
    "TransportUnavailable", "VersionMismatch", "as_payload", "cleanup_stale_segments", "connect",
    "open_receiver", "parse_url",
]


def _transport_class(scheme: str, role: str) -> type:
    """The ``role`` ("receiver" or "sender") class of ``scheme``, importing its module once."""
    entry = TRANSPORTS[scheme]
    return getattr(importlib.import_module(entry.module), getattr(entry, role))


def open_receiver(url: str, config: ReceiverConfig | None = None) -> Receiver:
    """Listen on ``url`` (tcp port 0 picks a free port; read the real one from ``.url``)."""
    ep = parse_url(url)
    return _transport_class(ep.scheme, "receiver")(ep, config or ReceiverConfig())


def connect(url: str, config: SenderConfig) -> Sender:
    """Connect a sender to the receiver at ``url`` (retries until ``connect_timeout_s``)."""
    ep = parse_url(url)
    return _transport_class(ep.scheme, "sender")(ep, config)
