"""Paged KV cache: a block allocator (pure bookkeeping) and the K/V tensors it indexes.

A sequence's tokens live in fixed-size blocks of ``block_size`` token slots; its *block table*
lists the blocks in order, so token ``p`` lives at slot ``table[p // bs] * bs + p % bs`` of the
flat cache. Sequences of any length share one pool with no padding waste; freeing a sequence
(finish, abort, preemption) returns its blocks at once.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from services.core.config import ModelConfig


class KVCacheFull(RuntimeError):
    """Not enough free blocks; the caller should wait, preempt, or reject the request."""


class BlockManager:
    """Fixed pool of ``num_blocks`` blocks; per-sequence block tables and lengths.

    ``append_slots`` grows a sequence by some tokens and returns their flat slot indices (the
    engine writes K/V there). All methods are O(blocks touched); nothing here touches tensors.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Pop from the end: freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (``megascale:kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Could a new sequence of ``num_tokens`` tokens get its blocks now?"""
        return self.blocks_needed(num_tokens) <= len(self._free)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables[seq_id]

    def seq_len(self, seq_id: Hashable) -> int:
        """Tokens whose slots have been handed out (K/V written or about to be)."""
        return self._lens[seq_id]

    # ------------------------------------------------------------------ mutations
    def allocate(self, seq_id: Hashable, num_tokens: int = 0) -> list[int]:
        """Register a sequence (length 0) and reserve blocks for ``num_tokens`` tokens."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already allocated")
        need = self.blocks_needed(num_tokens)
        if need > len(self._free):
            raise KVCacheFull(f"need {need} blocks for {num_tokens} tokens, "
                              f"{len(self._free)} free")
        self._tables[seq_id] = [self._free.pop() for _ in range(need)]
        self._lens[seq_id] = 0
        return self._tables[seq_id]

    def append_slots(self, seq_id: Hashable, num_new_tokens: int) -> None:
        """Extend ``seq_id`` by ``num_new_tokens``, taking blocks as needed (the tokens' flat
        slots follow from :meth:`block_table`; ``build_batch_meta`` computes them)."""
        if not self.try_append(seq_id, num_new_tokens):
            need = self.blocks_needed(self._lens[seq_id] + num_new_tokens) - len(
                self._tables[seq_id])
            raise KVCacheFull(f"sequence {seq_id!r} needs {need} more blocks, "
                              f"{len(self._free)} free")

    def try_append(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        """:meth:`append_slots` if the free blocks allow it (True), else change nothing
        (False). The scheduler's per-request hot path: one check-and-take."""
        table = self._tables[seq_id]
        end = self._lens[seq_id] + num_new_tokens
        need = -(-end // self.block_size) - len(table)
        if need > 0:  # most appends (one decode token) stay inside the last block
            free = self._free
            if need > len(free):
                return False
            table.extend([free.pop() for _ in range(need)])
        self._lens[seq_id] = end
        return True

    def free(self, seq_id: Hashable) -> None:
        """Return all of a sequence's blocks to the pool (finish, abort, preemption)."""
        self._free.extend(reversed(self._tables.pop(seq_id)))
        del self._lens[seq_id]


class PagedKVCache:
    """K and V tensors ``[num_layers, num_kv_heads, num_blocks, block_size, head_dim]``.

    Head-major: one (head, block) is a contiguous ``[block_size, head_dim]`` run, so gathering
    a sequence's blocks yields per-head contiguous context (see ``layers.paged_attention``).

    MLA models (``cfg.mla``) keep one latent entry per token instead (services/core/mla.py):
    ``k`` is ``[num_layers, 1, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`` and
    ``v`` is None.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        heads, dim = self.entry_shape(cfg)
        shape = (cfg.num_layers, heads, num_blocks, block_size, dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = None if cfg.mla is not None else torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def entry_shape(cfg: ModelConfig) -> tuple[int, int]:
        """(heads, dim) of one token's cache entry per layer and tensor."""
        if cfg.mla is not None:
            return 1, cfg.mla.cache_dim
        return cfg.num_kv_heads, cfg.head_dim

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Views ``[num_kv_heads, num_blocks, block_size, head_dim]`` of layer i's K and V
        (MLA: the latent cache and None)."""
        return self.k[i], None if self.v is None else self.v[i]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        heads, dim = PagedKVCache.entry_shape(cfg)
        tensors = 1 if cfg.mla is not None else 2
        return tensors * cfg.num_layers * block_size * heads * dim * elem

    @staticmethod
    def blocks_for_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                          budget_bytes: int) -> int:
        """How many blocks (all layers, K and V) fit in ``budget_bytes`` (0 if none)."""
        return max(0, budget_bytes // PagedKVCache.bytes_per_block(cfg, block_size, dtype))
