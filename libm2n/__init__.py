"""libm2n: the M-to-N activation transport (shm, tcp, rdma).

Quick use::

    rx = libm2n.open_receiver("shm://experts-0", libm2n.ReceiverConfig(slot_bytes=1 << 20))
    tx = libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=3))
    tx.send(tensor, step=7, layer=2, micro_batch=1, tag=42).result()
    with rx.recv(timeout=1.0) as msg:      # msg.tensor() aliases the slot until release
        out = expert_ffn(msg.tensor())

libm2n never imports ``services``; counters are plain ``stats()`` dicts.
"""

from libm2n.api import (
    Endpoint,
    Message,
    Receiver,
    ReceiverConfig,
    Sender,
    SenderConfig,
    as_payload,
    connect,
    open_receiver,
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
from libm2n.shm import cleanup_stale_segments

__all__ = [
    "CreditTimeout", "Endpoint", "InvalidArgument", "M2NError", "Message", "PeerLost",
    "ProtocolError", "Receiver", "ReceiverConfig", "Sender", "SenderConfig",
    "TransportUnavailable", "VersionMismatch", "as_payload", "cleanup_stale_segments", "connect",
    "open_receiver", "parse_url",
]
