"""8-bit weight-only quantization: int8 codes with one fp32 absmax per output row.

`code = round(w * 127 / absmax_row)`, `w ~ code * absmax_row / 127`: the row-wise ("vector-wise")
format of bitsandbytes' `int8_vectorwise_quant`, whose codes tests/quant compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Quant8bit:
    data: torch.Tensor  # int8 (out, in)
    absmax: torch.Tensor  # fp32 (out,)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "absmax": self.absmax}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_int8(w: torch.Tensor) -> Quant8bit:
    """Row-wise int8 codes of a 2-D weight (out, in)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"int8 quantization takes a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    w = w.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = 127.0 / absmax.clamp(min=1e-38)
    data = torch.round(w * scale.unsqueeze(1)).to(torch.int8)
    return Quant8bit(data=data, absmax=absmax)


def dequantize_int8(
    q: Quant8bit,
    dtype: torch.dtype = torch.float32,
    start: int = 0,
    stop: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [start, stop) of the weight (all rows by default), into `out` when given."""
    rows = q.data[start:stop]
    scale = (q.absmax[start:stop] / 127.0).unsqueeze(1)
    if out is not None and dtype == torch.float32:
        return torch.mul(rows, scale, out=out)
    result = (rows.to(torch.float32) * scale).to(dtype)
    return result if out is None else out.copy_(result)
