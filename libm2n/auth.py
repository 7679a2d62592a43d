"""Authenticating a libm2n link: a sender proves it holds the cluster's shared token.

When a receiver is configured with ``auth_token``, a sender's HELLO must carry
``hello_tag(token, sender_id)``, an HMAC-SHA256 of its sender id under the token; any other
HELLO is refused before the receiver allocates slot memory for it. The tag never reveals the
token. It is not bound to a connection, so on an untrusted network an eavesdropper who sees one
HELLO could replay it: run libm2n inside a private network (Kubernetes NetworkPolicy) or over an
encrypted one.
"""

from __future__ import annotations

import hashlib
import hmac

from libm2n.header import HELLO_TAG_BYTES

_CONTEXT = b"libm2n hello v1\0"


def hello_tag(token: bytes, sender_id: int) -> bytes:
    """The HELLO authentication tag of ``sender_id`` under ``token`` (HELLO_TAG_BYTES bytes)."""
    tag = hmac.new(token, _CONTEXT + sender_id.to_bytes(8, "little"), hashlib.sha256).digest()
    assert len(tag) == HELLO_TAG_BYTES
    return tag


def check_hello_tag(token: bytes, sender_id: int, tag: bytes) -> bool:
    """Whether ``tag`` is ``sender_id``'s tag under ``token`` (constant-time comparison)."""
    return hmac.compare_digest(tag, hello_tag(token, sender_id))
