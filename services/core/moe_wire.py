"""Payload layout of the MoE dispatch and combine messages carried by libm2n.

libm2n moves one 2-D tensor per message and knows nothing about models; this module is the one
place that says what those tensors hold. Both the attention replica and the expert node use it.

Dispatch (attention -> expert), one message per destination node per micro-batch per layer::

    float32 [n, H + 2K]   columns [0, H)      the n token rows (post-attention RMSNorm output)
                          columns [H, H+K)    top-k expert ids as floats (exact below 2**24);
                                              -1 where that (row, k) is served by another node
                          columns [H+K, H+2K) the matching gate weights (0 where id is -1)

    header: layer, micro_batch, step, tag (the sender's message id), epoch (placement epoch).

Combine (expert -> attention), one reply per dispatch, same tag::

    float32 [n, H]        sum_k w_k * FFN_{id_k}(row) over the ids the node served
                          (pre-weighted and pre-summed: the attention side only adds partials)

    or, when the node refuses the dispatch (bad shape, unknown layer, expert it does not host,
    stale epoch): uint8 [1, len] holding a UTF-8 error message. A refusal never closes the link.

Activations travel as float32 here whatever the compute dtype: bf16 and fp16 values are exact in
float32, so the expert node casts rows and gate weights back to its compute dtype and computes on
the very tensors the replica's router produced (tests/engine/test_engine_half_precision.py). It
costs twice the bytes of a bf16 wire format, which would need the ids in a side tensor; left for
the GPU path.
"""

from __future__ import annotations

import torch

DISPATCH_DTYPE = torch.float32
_MAX_EXACT_ID = 1 << 24


def pack_dispatch(rows: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
                  ) -> torch.Tensor:
    """rows [n, H], topk_ids [n, K] int (-1 = not here), topk_weights [n, K] -> [n, H + 2K]."""
    return torch.cat([rows.to(DISPATCH_DTYPE), topk_ids.to(DISPATCH_DTYPE),
                      topk_weights.to(DISPATCH_DTYPE)], dim=1)


def unpack_dispatch(payload: torch.Tensor, hidden: int, top_k: int, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_dispatch`; validates the layout.

    Returns ``(rows [n, H], topk_ids [n, K] int64, topk_weights [n, K])``; the tensors are views
    of ``payload`` except the ids. Raises ValueError with a one-line reason on a bad payload.
    """
    if payload.dtype != DISPATCH_DTYPE or payload.dim() != 2:
        raise ValueError(f"dispatch payload must be 2-D {DISPATCH_DTYPE}, got "
                         f"{payload.dim()}-D {payload.dtype}")
    if payload.shape[1] != hidden + 2 * top_k:
        raise ValueError(f"dispatch payload has {payload.shape[1]} columns, expected "
                         f"hidden + 2 * top_k = {hidden + 2 * top_k}")
    raw_ids = payload[:, hidden: hidden + top_k]
    ids = raw_ids.to(torch.int64)
    if payload.shape[0] and (bool((ids.to(DISPATCH_DTYPE) != raw_ids).any())
                             or int(ids.min()) < -1 or int(ids.max()) >= num_experts):
        raise ValueError(f"dispatch payload carries expert ids outside [-1, {num_experts})")
    if num_experts >= _MAX_EXACT_ID:
        raise ValueError("expert ids >= 2**24 cannot be carried exactly as float32")
    return payload[:, :hidden], ids, payload[:, hidden + top_k:]


def pack_error(message: str) -> torch.Tensor:
    """An error reply payload: uint8 [1, len] of the UTF-8 message (at most 1 KiB)."""
    data = message.encode("utf-8", errors="replace")[:1024] or b"error"
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(1, -1)


def is_error(payload: torch.Tensor) -> bool:
    return payload.dtype == torch.uint8


def error_text(payload: torch.Tensor) -> str:
    return bytes(payload.reshape(-1).tolist()).decode("utf-8", errors="replace")
