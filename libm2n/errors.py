"""Errors raised by libm2n.

libm2n never imports ``services``; callers map these onto their own error types
(``InvalidArgument`` is a ``ValueError`` so it reads as bad user input, the others are
runtime transport failures).
"""

from __future__ import annotations


class M2NError(Exception):
    """Base class of every libm2n error."""


class InvalidArgument(M2NError, ValueError):
    """A bad URL, config value or payload given by the caller (one-line message)."""


class TransportUnavailable(M2NError):
    """The transport cannot run on this machine (e.g. no RDMA device)."""


class ProtocolError(M2NError):
    """A frame failed validation (bad magic, kind, dtype, sizes, slot...)."""


class VersionMismatch(ProtocolError):
    """The peer speaks another header version."""


class PeerLost(M2NError):
    """The peer died, closed, refused us, or stopped granting credits within the bound."""


class CreditTimeout(PeerLost):
    """No credit came from the receiver within ``peer_timeout_s``; the peer is treated as lost."""
