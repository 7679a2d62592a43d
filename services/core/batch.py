"""BatchMeta: everything one forward step needs to know about its flat token list.

A step runs ``T`` tokens from ``B`` sequences laid end to end (sequence b owns tokens
``[query_start[b], query_start[b] + query_lens[b])``); prefill chunks and single decode tokens
mix freely. Attention is computed on a padded ``[B, max_query_len]`` query layout against each
sequence's K/V gathered through its block table into ``[B, max_seq_len]``, with a boolean mask
(causal, context length, optional sliding window): one SDPA call per layer, no per-token loops.
The meta is built once per step and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchMeta:
    """Per-step index tensors (all on the model's device).

    positions     [T] int64   absolute position of each token in its sequence
    slot_mapping  [T] int64   flat KV slot (block * block_size + offset) to write each token's K/V
    block_tables  [B, NBmax] int64   padded with 0 (masked out by ``attn_mask``)
    q_gather      [T] int64   index of each token in the padded ``[B * max_query_len]`` layout
    attn_mask     [B, 1, max_query_len, max_seq_len] bool   True = may attend
    last_index    [B] int64   flat index of each sequence's last token (for logits)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    q_gather: torch.Tensor
    attn_mask: torch.Tensor
    last_index: torch.Tensor
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    max_query_len: int
    max_seq_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def build_batch_meta(block_tables: Sequence[Sequence[int]], starts: Sequence[int],
                     query_lens: Sequence[int], block_size: int,
                     device: str | torch.device = "cpu",
                     sliding_window: int | None = None) -> BatchMeta:
    """Build the meta for sequences whose new tokens occupy positions
    ``[starts[b], starts[b] + query_lens[b])``; their block tables must already cover them.
    """
    B = len(block_tables)
    if not (B == len(starts) == len(query_lens)) or B == 0:
        raise ValueError("block_tables, starts and query_lens must be non-empty and equal length")
    if any(q < 1 for q in query_lens):
        raise ValueError("every sequence needs at least one new token")
    seq_lens = [s + q for s, q in zip(starts, query_lens, strict=True)]
    qmax, smax = max(query_lens), max(seq_lens)
    nbmax = max(len(t) for t in block_tables)
    for b, t in enumerate(block_tables):
        if len(t) * block_size < seq_lens[b]:
            raise ValueError(f"block table of sequence {b} covers {len(t) * block_size} tokens, "
                             f"needs {seq_lens[b]}")
    tables = torch.zeros(B, nbmax, dtype=torch.int64)
    for b, t in enumerate(block_tables):
        tables[b, : len(t)] = torch.tensor(t, dtype=torch.int64)

    qlens = torch.tensor(query_lens, dtype=torch.int64)
    start_t = torch.tensor(starts, dtype=torch.int64)
    seq_of = torch.repeat_interleave(torch.arange(B), qlens)  # [T]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), qlens.cumsum(0)[:-1]])
    local = torch.arange(int(qlens.sum())) - offsets[seq_of]  # index within the sequence's chunk
    positions = start_t[seq_of] + local
    blocks = tables[seq_of, positions // block_size]
    slot_mapping = blocks * block_size + positions % block_size
    q_gather = seq_of * qmax + local

    # Padded query rows reuse the sequence's last real position so no mask row is all-False
    # (that would make SDPA return NaN); their outputs are never gathered back.
    i = torch.arange(qmax)
    q_pos = start_t[:, None] + torch.minimum(i[None, :], (qlens - 1)[:, None])  # [B, qmax]
    k_pos = torch.arange(smax)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # causal; also bounds by seq_len
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    last_index = offsets + qlens - 1

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return BatchMeta(
        positions=dev(positions), slot_mapping=dev(slot_mapping), block_tables=dev(tables),
        q_gather=dev(q_gather), attn_mask=dev(mask[:, None]), last_index=dev(last_index),
        query_lens=tuple(query_lens), seq_lens=tuple(seq_lens), max_query_len=qmax,
        max_seq_len=smax)
