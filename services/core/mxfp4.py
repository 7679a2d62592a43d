"""MXFP4 expert weights (the format gpt-oss ships): detect and dequantize at load.

``config.json`` carries ``"quantization_config": {"quant_method": "mxfp4", ...}`` and each
quantized expert tensor ``W`` (``[E, R, C]``, out-major) is stored as two uint8 tensors::

    <name>_blocks  [E, R, C / 32, 16]   two FP4 (e2m1) codes per byte, low nibble first
    <name>_scales  [E, R, C / 32]       one shared power of two per 32 values, biased by 127

so ``W[e, r, 32 g + j] = FP4[code j of block (e, r, g)] * 2^(scales[e, r, g] - 127)``. Every
product is exact in bf16 and float32 (a 2-bit mantissa times a power of two), so dequantizing
to the compute dtype loses nothing. Loading dequantizes on every device (the packed form is
not kept resident: there is no MXFP4 GEMM here).
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 32  # values per shared scale
# e2m1 code -> value (sign bit 3)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(d: dict[str, Any]) -> bool:
    """Whether a config.json dict declares MXFP4 weights."""
    q = d.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
               key: str = "weight") -> torch.Tensor:
    """blocks [..., R, G, 16] uint8, scales [..., R, G] uint8 -> [..., R, G * 32] ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{key}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} "
                         f"and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"{key}_blocks has shape {list(blocks.shape)}, expected "
                         f"{list(scales.shape) + [BLOCK // 2]} for scales {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]
    values = lut[codes].flatten(-2)  # [..., R, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing test checkpoints: weight [..., R, C] (C a multiple of 32) ->
    (blocks [..., R, C / 32, 16], scales [..., R, C / 32]) uint8, each value rounded to the
    nearest FP4 number after scaling its block's largest magnitude to at most 6."""
    *prefix, R, C = weight.shape
    if C % BLOCK:
        raise ValueError(f"MXFP4 needs the input dim to be a multiple of {BLOCK}, got {C}")
    w = weight.float().reshape(*prefix, R, C // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # 6 * 2^exp >= amax
    scaled = w / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES[:8])
    mag = (scaled.abs()[..., None] - lut).abs().argmin(dim=-1)  # nearest magnitude code
    codes = (mag + 8 * (scaled < 0).long()).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()
