"""The value tables of the low-bit formats, laid out exactly as bitsandbytes stores them.

- NF4 (QLoRA paper): 16 quantiles of N(0, 1), normalised to [-1, 1]; index 7 is exact zero.
- FP4: bitsandbytes' 4-bit float (sign bit, 2 exponent bits, 1 mantissa bit), normalised to
  [-1, 1]; the index is the bit pattern, so the table is not sorted.
- dynamic 8-bit: the signed "dynamic tree" map bitsandbytes uses for its 8-bit blockwise
  quantization, which double quantization applies to the per-block absmax values.

Same tables give the same codes, so weights quantized here and by bitsandbytes are interchangeable.
"""

from __future__ import annotations

from functools import lru_cache

import torch

# normal quantiles are taken between 1 - NF4_OFFSET and NF4_OFFSET (the paper's choice)
NF4_OFFSET = 0.9677083

# FP4 values before normalisation, by 3-bit pattern (exponent bits first, then mantissa):
# 00x is subnormal (0, 1/16); 01x, 10x, 11x are (8, 12), (4, 6), (2, 3)
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


@lru_cache(maxsize=None)
def _nf4_cpu() -> torch.Tensor:
    # 8 positive quantiles (plus zero) and 7 negative ones: the asymmetric type with an exact 0
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return values / values.max()


@lru_cache(maxsize=None)
def _fp4_cpu() -> torch.Tensor:
    mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / max(_FP4_MAGNITUDES)
    return torch.cat([mags, -mags])  # bit 3 is the sign


@lru_cache(maxsize=None)
def _dynamic8_cpu() -> torch.Tensor:
    # for exponent e = 0..6, 2**e evenly spaced mantissas in [0.1, 1) (bin centres), scaled by
    # 10**(e - 6), with both signs; plus 0 and 1: 2 * 127 + 2 = 256 values
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (e - 6)) * centres
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values of `quant_type` ('nf4' or 'fp4'), indexed by 4-bit code."""
    if quant_type == "nf4":
        return _nf4_cpu().to(device)
    if quant_type == "fp4":
        return _fp4_cpu().to(device)
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def code_dynamic8(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted values of the signed dynamic 8-bit map."""
    return _dynamic8_cpu().to(device)


@lru_cache(maxsize=None)
def _pair_table_cpu(quant_type: str) -> torch.Tensor:
    code = code_4bit(quant_type)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)  # high nibble first


def pair_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(256, 2): the two values a packed byte holds, so dequantizing is one gather per byte."""
    return _pair_table_cpu(quant_type).to(device)
