"""What a payload is on the wire: dtype codes and :func:`as_payload` (object -> bytes view).

A message carries one ``(rows, cols)`` array of one of the :class:`~libm2n.header.DType` codes.
This module maps torch and numpy dtypes to those codes and back (:data:`TORCH_CODES`,
:data:`NUMPY_CODES`, :data:`CODE_NAMES`) and turns a tensor, ndarray or bytes-like into the
bytes to copy (:func:`as_payload`). torch and numpy are imported only when such an object shows
up. :mod:`libm2n.fastpath` builds its C payload path on these tables;
:class:`libm2n.base.Message` uses :data:`CODE_NAMES` to view a received payload.
"""

from __future__ import annotations

from typing import Any

from libm2n.errors import InvalidArgument
from libm2n.header import DType

__all__ = ["CODE_NAMES", "NUMPY_CODES", "TORCH_CODES", "TORCH_CODES_BY_NAME", "as_payload"]

TORCH_CODES: dict[str, int] = {  # str(torch dtype) -> code
    "torch.uint8": DType.UINT8, "torch.int8": DType.INT8, "torch.int16": DType.INT16,
    "torch.int32": DType.INT32, "torch.int64": DType.INT64, "torch.float16": DType.FLOAT16,
    "torch.bfloat16": DType.BFLOAT16, "torch.float32": DType.FLOAT32,
    "torch.float64": DType.FLOAT64, "torch.bool": DType.BOOL,
}
# (attribute name on the torch module, code) pairs, for tables keyed by the dtype objects
TORCH_CODES_BY_NAME = tuple((k.removeprefix("torch."), v) for k, v in TORCH_CODES.items())
NUMPY_CODES: dict[str, int] = {  # str(numpy dtype) -> code (numpy has no bfloat16)
    "uint8": DType.UINT8, "int8": DType.INT8, "int16": DType.INT16, "int32": DType.INT32,
    "int64": DType.INT64, "float16": DType.FLOAT16, "float32": DType.FLOAT32,
    "float64": DType.FLOAT64, "bool": DType.BOOL,
}
# code -> dtype name: an attribute of torch, and numpy's name too for all but bfloat16
CODE_NAMES: dict[int, str] = {
    DType.UINT8: "uint8", DType.INT8: "int8", DType.INT16: "int16", DType.INT32: "int32",
    DType.INT64: "int64", DType.FLOAT16: "float16", DType.BFLOAT16: "bfloat16",
    DType.FLOAT32: "float32", DType.FLOAT64: "float64", DType.BOOL: "bool",
}

_DTYPE_CACHE: dict[Any, int | None] = {}  # torch/numpy dtype object -> code (None: refused)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, shape[-1]


def as_payload(obj: Any) -> tuple[memoryview, int, int, int]:
    """Return ``(bytes view, rows, cols, dtype code)`` for a tensor, ndarray or bytes-like.

    A torch tensor of shape ``(..., C)`` travels as ``rows = prod(...)``, ``cols = C``; bytes
    travel as uint8 ``1 x len``. CUDA tensors are staged through pinned host memory (one
    device-to-host copy). Non-contiguous inputs are made contiguous (one extra copy).
    """
    mod = type(obj).__module__
    if mod.startswith("torch"):
        import torch

        if not isinstance(obj, torch.Tensor):
            raise InvalidArgument(f"cannot send a {type(obj).__name__}")
        code = _DTYPE_CACHE.get(obj.dtype)
        if code is None:
            code = TORCH_CODES.get(str(obj.dtype))
            _DTYPE_CACHE[obj.dtype] = code
        if code is None:
            raise InvalidArgument(f"cannot send a tensor of dtype {obj.dtype}")
        t = obj.detach()
        if t.device.type != "cpu":
            # Stage through pinned host memory so the device->host copy is a DMA.
            staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            staged.copy_(t)
            t = staged
        t = t.contiguous()
        rows, cols = _rows_cols(tuple(t.shape))
        flat = t.reshape(-1)
        view = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
        return view.cast("B") if view.ndim == 1 else view, rows, cols, code
    if mod.startswith("numpy"):
        import numpy as np

        if not isinstance(obj, np.ndarray):
            raise InvalidArgument(f"cannot send a {type(obj).__name__}")
        code = _DTYPE_CACHE.get(obj.dtype)
        if code is None:
            code = NUMPY_CODES.get(str(obj.dtype))  # str(dtype) is slow: once per dtype
            _DTYPE_CACHE[obj.dtype] = code
        if code is None:
            raise InvalidArgument(f"cannot send an array of dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj)
        rows, cols = _rows_cols(arr.shape)
        return memoryview(arr.reshape(-1).view(np.uint8)), rows, cols, code
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgument(f"cannot send a {type(obj).__name__}: expected a torch tensor, "
                              "numpy array or bytes-like") from None
    if not view.contiguous:
        raise InvalidArgument("cannot send a non-contiguous buffer")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return view, 1, len(view), DType.UINT8
