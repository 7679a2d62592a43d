"""FP8 block-quantized checkpoints (the format DeepSeek-V3 ships): parse and dequantize.

``config.json`` carries::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

and every quantized linear weight ``W`` (``[out, in]``, ``float8_e4m3fn``) has a companion
``<name>.weight_scale_inv`` (``[ceil(out / b0), ceil(in / b1)]``, float32): the real weight is
``W[i, j] * scale_inv[i // b0, j // b1]`` (despite the name, a multiplier). Norms, embeddings,
the LM head and the routers stay unquantized.

Loading dequantizes at read time to the compute dtype (``CheckpointIndex.read``), on every
device: the kernels here compute in float32 / bf16 / fp16. Keeping the FP8 weights resident on
a GPU and multiplying with ``torch._scaled_mm`` is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.errors import ConfigError

SCALE_SUFFIX = "_scale_inv"  # appended to the weight's key: "...proj.weight_scale_inv"
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class FP8BlockSpec:
    """A block-wise FP8 weight format: ``block`` = (rows, cols) per scale."""

    fmt: str = "e4m3"
    block: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        if self.fmt not in FP8_FORMATS:
            raise ConfigError(f"quantization_config.fmt: {self.fmt!r} is not supported "
                              f"(supported: {', '.join(FP8_FORMATS)})")
        if len(self.block) != 2 or any(not isinstance(b, int) or b < 1 for b in self.block):
            raise ConfigError(f"quantization_config.weight_block_size must be two positive "
                              f"integers, got {list(self.block)}")

    @property
    def dtype(self) -> torch.dtype:
        return FP8_FORMATS[self.fmt]


def parse_quantization_config(d: dict[str, Any]) -> FP8BlockSpec | None:
    """``config.json``'s ``quantization_config`` -> spec (None when absent); anything but
    block-wise FP8 is a one-line ConfigError naming the key."""
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("quantization_config must be an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method: {method!r} is not supported "
                          "(supported: fp8 with weight_block_size)")
    block = q.get("weight_block_size")
    if not isinstance(block, list | tuple):
        raise ConfigError("quantization_config.weight_block_size is required (per-tensor FP8 "
                          "is not supported)")
    return FP8BlockSpec(fmt=q.get("fmt", "e4m3"), block=tuple(block))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, spec: FP8BlockSpec,
               dtype: torch.dtype, key: str = "weight") -> torch.Tensor:
    """weight [out, in] FP8, scale_inv [ceil(out/b0), ceil(in/b1)] -> [out, in] in ``dtype``
    (the product is taken in float32, then rounded once)."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"{key}: block-quantized weights are 2-D, got {list(weight.shape)} "
                         f"with scales {list(scale_inv.shape)}")
    b0, b1 = spec.block
    out, inp = weight.shape
    want = (-(-out // b0), -(-inp // b1))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{key}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}, expected "
                         f"{list(want)} for a {[out, inp]} weight in {b0}x{b1} blocks")
    scale = scale_inv.float().repeat_interleave(b0, 0)[:out].repeat_interleave(b1, 1)[:, :inp]
    return (weight.float() * scale).to(dtype)


def quantize(weight: torch.Tensor, spec: FP8BlockSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing test checkpoints and tools: weight [out, in] ->
    (FP8 [out, in], scale_inv [ceil(out/b0), ceil(in/b1)] float32), each block scaled so its
    largest magnitude maps to the format's max."""
    b0, b1 = spec.block
    out, inp = weight.shape
    rows, cols = -(-out // b0), -(-inp // b1)
    w = weight.float()
    padded = w.new_zeros(rows * b0, cols * b1)
    padded[:out, :inp] = w
    blocks = padded.view(rows, b0, cols, b1)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [rows, cols]
    scale_inv = amax / torch.finfo(spec.dtype).max
    q = (blocks / scale_inv[:, None, :, None]).view(rows * b0, cols * b1)[:out, :inp]
    return q.to(spec.dtype).contiguous(), scale_inv.contiguous()
