"""Content hashes of full token blocks, chained over the prefix (prefix caching and
cache-aware routing).

Block ``i`` of a token sequence (tokens ``[i*bs, (i+1)*bs)``) is named by
``h_i = H(h_{i-1} || tokens of block i)`` with ``h_{-1} = b""``: a hash names the block's
tokens *and everything before them*, which is what a block's K/V depends on (causal
attention at fixed positions). Only full blocks have a hash. ``H`` is SHA-256 truncated to
16 bytes: a collision would make two different prefixes share K/V (wrong tokens), so a
64-bit ``hash()`` is not enough for the replica's cache; routing only needs 8 of the bytes
(:func:`routing_key`).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROUTING_BLOCK_SIZE = 16  # tokens per block of the gateway's routing hashes (any replica size)
MAX_ROUTING_BLOCKS = 256  # leading blocks a PickReplica carries (4096 tokens)
HASH_BYTES = 16


def extend_chain(hashes: list[bytes], tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Append to ``hashes`` (the chain of a sequence's first blocks) the hashes of the full
    blocks of ``tokens``, the tokens that follow those blocks; returns ``hashes``."""
    prev = hashes[-1] if hashes else b""
    for i in range(len(tokens) // block_size):
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        prev = hashlib.sha256(prev + block).digest()[:HASH_BYTES]
        hashes.append(prev)
    return hashes


def chain_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None
                 ) -> list[bytes]:
    """The chained hashes of ``tokens``' full blocks (at most ``limit`` of them)."""
    if limit is not None:
        tokens = tokens[:limit * block_size]
    return extend_chain([], tokens, block_size)


def routing_key(h: bytes) -> int:
    """The 64-bit key of a block hash that travels in ``PickReplicaRequest``."""
    return int.from_bytes(h[:8], "little")


def routing_keys(prompt: Sequence[int]) -> list[int]:
    """The ``PickReplicaRequest.prefix_hashes`` of a prompt (cache-aware routing)."""
    return [routing_key(h) for h in chain_hashes(prompt, ROUTING_BLOCK_SIZE, MAX_ROUTING_BLOCKS)]
