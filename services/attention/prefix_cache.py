"""Prefix caching: full KV blocks shared across requests by content (vLLM v1 style).

:class:`PrefixCachingBlockManager` is a :class:`~services.core.kv_cache.BlockManager` whose
blocks carry reference counts, and whose *full, computed* blocks are registered under their
chained content hash (services/core/prefix_hash.py: a hash names a block's tokens and every
token before them). A new request walks its own block hashes from the start and takes every
block found (refcount + 1) instead of computing it again; prefill starts after them.

Life of a block::

    free ──take──▶ in use (ref ≥ 1) ──commit──▶ in use + cached (hash → block)
      ▲                 │ ref → 0                    │ ref → 0
      └─────────────────┘                            ▼
      ◀──evict (LRU, only when the free list is empty)── cached, evictable (ref 0)

- Only full blocks are hashed and shared: a request never writes into a shared block (the
  cached prefix is capped one token short of the request's tokens, so its last token is
  always computed: it produces the logits).
- A block is committed (registered) only once its K/V has been written: by the batcher
  when it schedules the request's next chunk (the lane is between steps, so the previous
  step is over), at preemption, and when the request finishes (not after an error: its step
  may have written part of the layers).
- Blocks of finished requests stay cached with refcount 0 and count as *free*
  (``num_free_blocks``, ``usage``); they are evicted least recently used first, and only when
  the free list runs dry. A block in use (ref ≥ 1) is never evicted.
- Two requests that computed the same block at the same time keep two copies; the first
  committed is the one shared.

Hits and queries are counted in tokens at admission (``megascale:prefix_cache_queries`` /
``hits``, as vLLM counts them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from services.core.kv_cache import BlockManager, KVCacheFull


class PrefixCachingBlockManager(BlockManager):
    """A block pool with refcounts, a hash → block map and an LRU of evictable blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}           # cached block -> its hash
        self._cached: dict[bytes, int] = {}            # hash -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 and cached; LRU first
        self._committed: dict[Hashable, int] = {}      # seq -> its leading blocks registered
        self.queries = 0                               # tokens looked up at admission
        self.hits = 0                                  # of which found cached
        self.evictions = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached blocks no request holds are free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def can_allocate(self, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
        """Could a new sequence of ``num_tokens`` tokens whose first blocks are the cached
        ``prefix`` get its blocks now? (Taking an evictable prefix block uses up a free one.)"""
        new = max(0, self.blocks_needed(num_tokens) - len(prefix))
        revived = sum(1 for b in prefix if self._ref[b] == 0)
        return new + revived <= self.num_free_blocks

    def match(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` (at most ``max_blocks``)."""
        out: list[int] = []
        cached = self._cached
        for h in hashes[:max_blocks]:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def committed(self, seq_id: Hashable) -> int:
        """How many of ``seq_id``'s leading blocks are registered (cached) already."""
        return self._committed[seq_id]

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ------------------------------------------------------------------ mutations
    def _take(self) -> int:
        """A block for new tokens: a free one, else the least recently used cached one."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(b)]
            self.evictions += 1
        self._ref[b] = 1
        return b

    def allocate(self, seq_id: Hashable, num_tokens: int = 0,
                 prefix: Sequence[int] = ()) -> list[int]:
        """Register a sequence that starts with the cached blocks ``prefix`` (its length is
        ``len(prefix) * block_size``) and reserve blocks for ``num_tokens`` tokens in all."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already allocated")
        if not self.can_allocate(num_tokens, prefix):
            raise KVCacheFull(f"need {self.blocks_needed(num_tokens)} blocks for {num_tokens} "
                              f"tokens ({len(prefix)} cached), {self.num_free_blocks} free")
        for b in prefix:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        table = list(prefix)
        new = self.blocks_needed(num_tokens) - len(prefix)  # <= 0: the prefix covers them
        table.extend(self._take() for _ in range(new))
        self._tables[seq_id] = table
        self._lens[seq_id] = len(prefix) * self.block_size
        self._committed[seq_id] = len(prefix)
        return table

    def try_append(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        table = self._tables[seq_id]
        end = self._lens[seq_id] + num_new_tokens
        need = -(-end // self.block_size) - len(table)
        if need > 0:
            if need > self.num_free_blocks:
                return False
            table.extend(self._take() for _ in range(need))
        self._lens[seq_id] = end
        return True

    def commit(self, seq_id: Hashable, hashes: Sequence[bytes], num_computed: int) -> None:
        """Register ``seq_id``'s full blocks among its first ``num_computed`` tokens (their K/V
        written) under ``hashes`` (the sequence's chained block hashes, long enough)."""
        done = self._committed[seq_id]
        upto = min(num_computed // self.block_size, len(hashes))
        if upto <= done:
            return
        table = self._tables[seq_id]
        for i in range(done, upto):
            h = hashes[i]
            if h not in self._cached:  # else another copy is already shared: keep that one
                b = table[i]
                self._cached[h] = b
                self._hash_of[b] = h
        self._committed[seq_id] = upto

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references; its cached blocks stay cached (evictable). Tail
        blocks are queued for eviction before the prefix blocks they extend."""
        table = self._tables.pop(seq_id)
        del self._lens[seq_id]
        del self._committed[seq_id]
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit
