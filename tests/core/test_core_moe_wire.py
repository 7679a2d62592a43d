"""The MoE wire format (services/core/moe_wire.py): byte-exact round trips in every compute
dtype, ids and gate weights in their own sections, sizes, and refusals that name the problem."""

from __future__ import annotations

import pytest
import torch

from services.core import moe_wire


def _routed(n: int, hidden: int, top_k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, hidden, generator=g).to(dtype)
    ids = torch.randint(0, 8, (n, top_k), generator=g)
    ids[::3, -1] = -1                                   # some (row, k) served elsewhere
    weights = torch.rand(n, top_k, generator=g).to(dtype)
    weights[ids < 0] = 0
    return rows, ids, weights


@pytest.mark.parametrize("dtype", moe_wire.WIRE_DTYPES)
@pytest.mark.parametrize("n, hidden, top_k", [(5, 64, 2), (1, 7, 3), (0, 64, 2), (33, 130, 8)])
def test_dispatch_round_trip_is_exact(dtype, n, hidden, top_k):
    rows, ids, weights = _routed(n, hidden, top_k, dtype)
    payload = moe_wire.pack_dispatch(rows, ids, weights)
    assert payload.dtype == torch.uint8
    assert tuple(payload.shape) == (n, moe_wire.row_bytes(hidden, top_k, dtype))
    assert payload.numel() == moe_wire.dispatch_bytes(n, hidden, top_k, dtype)
    received = payload.clone()  # what libm2n hands the node: other memory, the same bytes
    got_rows, got_ids, got_weights = moe_wire.unpack_dispatch(received, hidden, top_k, 8, dtype)
    assert got_rows.dtype == dtype and torch.equal(got_rows.view(torch.uint8),
                                                   rows.view(torch.uint8))
    assert got_ids.dtype == torch.int64 and torch.equal(got_ids, ids)
    # gate weights travel as float32, which holds bf16/fp16 values exactly
    assert got_weights.dtype == torch.float32 and torch.equal(got_weights.to(dtype), weights)


def test_half_precision_halves_the_bytes():
    fp32 = moe_wire.dispatch_bytes(512, 7168, 8, torch.float32)
    bf16 = moe_wire.dispatch_bytes(512, 7168, 8, torch.bfloat16)
    assert bf16 == 512 * (7168 * 2 + 8 * 8) and fp32 == 512 * (7168 * 4 + 8 * 8)
    assert moe_wire.combine_bytes(512, 7168, torch.bfloat16) == 512 * 7168 * 2


@pytest.mark.parametrize("payload, message", [
    (torch.zeros(3, 68), "uint8"),                                  # a float tensor
    (torch.zeros(3, 67, dtype=torch.uint8), "expected 272"),        # wrong row width
])
def test_bad_layout_is_refused_with_a_reason(payload, message):
    with pytest.raises(ValueError, match=message):
        moe_wire.unpack_dispatch(payload, 64, 2, 8, torch.float32)


def test_dtype_mismatch_names_the_flag():
    rows, ids, weights = _routed(4, 64, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="--dtype"):
        moe_wire.unpack_dispatch(moe_wire.pack_dispatch(rows, ids, weights), 64, 2, 8,
                                 torch.float32)


def test_ids_outside_the_model_are_refused():
    rows, ids, weights = _routed(4, 64, 2, torch.float32)
    with pytest.raises(ValueError, match="outside"):
        moe_wire.unpack_dispatch(moe_wire.pack_dispatch(rows, ids + 8, weights), 64, 2, 8,
                                 torch.float32)
    ids[0, 0] = -2
    with pytest.raises(ValueError, match="outside"):
        moe_wire.unpack_dispatch(moe_wire.pack_dispatch(rows, ids, weights), 64, 2, 8,
                                 torch.float32)


def test_rows_of_other_dtypes_cannot_travel():
    with pytest.raises(ValueError, match="cannot travel"):
        moe_wire.pack_dispatch(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 1),
                               torch.zeros(2, 1))
