"""Payload layout of the MoE dispatch and combine messages carried by libm2n.

libm2n moves one 2-D tensor per message and knows nothing about models; this module is the one
place that says what those tensors hold. Both the attention replica and the expert node use it,
and both compute in the same dtype (``--dtype``: float32, bfloat16 or float16), which is the
dtype activations travel in.

Dispatch (attention -> expert), one message per destination node per micro-batch per layer,
a uint8 tensor ``[n, row_bytes(H, K, dtype)]`` whose bytes are three sections, in order::

    int32   [n, K]   top-k expert ids; -1 where that (row, k) is served by another node
    float32 [n, K]   the matching gate weights (0 where the id is -1): exact for every
                     compute dtype, so the node weights with the router's very values
    dtype   [n, H]   the n token rows (post-attention RMSNorm output), in the compute dtype

    header: layer, micro_batch, step, tag (the sender's message id), epoch (placement epoch).

The two small sections come first so the rows start 8-byte aligned whatever ``n``, ``K`` and
``H`` are; every section is then a plain view of the slot (no copy on the node).

Combine (expert -> attention), one reply per dispatch, same tag::

    dtype   [n, H]   sum_k w_k * FFN_{id_k}(row) over the ids the node served
                     (pre-weighted and pre-summed: the attention side only adds partials)

    or, when the node refuses the dispatch (bad layout, unknown layer, expert it does not
    host, stale epoch): uint8 [1, len] holding a UTF-8 error message. A refusal never closes
    the link.
"""

from __future__ import annotations

import torch

WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SMALL_BYTES = 8  # per (row, k): an int32 id and a float32 weight


def row_bytes(hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """Bytes one token row takes in a dispatch."""
    return top_k * _SMALL_BYTES + hidden * dtype.itemsize


def dispatch_bytes(rows: int, hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """Payload bytes of a dispatch of ``rows`` token rows (what a receive slot must hold)."""
    return rows * row_bytes(hidden, top_k, dtype)


def combine_bytes(rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Payload bytes of the combine reply to a dispatch of ``rows`` rows."""
    return rows * hidden * dtype.itemsize


def pack_dispatch(rows: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
                  ) -> torch.Tensor:
    """rows [n, H] (compute dtype), topk_ids [n, K] int (-1 = not here), topk_weights [n, K]
    -> uint8 [n, row_bytes], on the rows' device."""
    n, hidden = rows.shape
    k = topk_ids.shape[1]
    if rows.dtype not in WIRE_DTYPES:
        raise ValueError(f"rows of dtype {rows.dtype} cannot travel; use one of {WIRE_DTYPES}")
    width = row_bytes(hidden, k, rows.dtype)
    out = torch.empty(n * width, dtype=torch.uint8, device=rows.device)
    small = n * k * 4
    out[:small].view(torch.int32).view(n, k).copy_(topk_ids)
    out[small: 2 * small].view(torch.float32).view(n, k).copy_(topk_weights)
    out[2 * small:].view(rows.dtype).view(n, hidden).copy_(rows)
    return out.view(n, width)


def unpack_dispatch(payload: torch.Tensor, hidden: int, top_k: int, num_experts: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_dispatch` for a node computing in ``dtype``; validates the layout.

    Returns ``(rows [n, H] dtype, topk_ids [n, K] int64, topk_weights [n, K] float32)``; rows
    and weights are views of ``payload``. Raises ValueError with a one-line reason.
    """
    width = row_bytes(hidden, top_k, dtype)
    if payload.dtype != torch.uint8 or payload.dim() != 2:
        raise ValueError(f"dispatch payload must be 2-D uint8, got {payload.dim()}-D "
                         f"{payload.dtype}")
    if payload.shape[1] != width:
        raise ValueError(f"dispatch rows are {payload.shape[1]} bytes, expected {width} "
                         f"(top_k {top_k} ids and weights + hidden {hidden} in {dtype}; the "
                         "replica and the node must run the same model and --dtype)")
    n = payload.shape[0]
    flat = payload.reshape(-1)
    small = n * top_k * 4
    ids = flat[:small].view(torch.int32).view(n, top_k).to(torch.int64)
    if n and (int(ids.min()) < -1 or int(ids.max()) >= num_experts):
        raise ValueError(f"dispatch payload carries expert ids outside [-1, {num_experts})")
    weights = flat[small: 2 * small].view(torch.float32).view(n, top_k)
    rows = flat[2 * small:].view(dtype).view(n, hidden)
    return rows, ids, weights


# An expert node's refusal of a dispatch routed by an older placement than the node's (the
# sender is behind and will catch up): the error text starts with this.
STALE_EPOCH = "stale placement epoch"


def pack_error(message: str) -> torch.Tensor:
    """An error reply payload: uint8 [1, len] of the UTF-8 message (at most 1 KiB)."""
    data = message.encode("utf-8", errors="replace")[:1024] or b"error"
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(1, -1)


def is_error(payload: torch.Tensor) -> bool:
    """A combine reply is an error when it is bytes: real replies are in a float dtype."""
    return payload.dtype == torch.uint8


def error_text(payload: torch.Tensor) -> str:
    return bytes(payload.reshape(-1).tolist()).decode("utf-8", errors="replace")
