"""Blockwise 4-bit (NF4 / FP4) and 8-bit dynamic quantization, in bitsandbytes' storage layout.

4-bit: the flattened tensor is cut into blocks of `blocksize` values (64 by default); each block
is scaled by its absmax into [-1, 1] and every value takes the nearest of the 16 code values.
Two codes share a byte, the first value in the high nibble. Double quantization stores the fp32
absmax values as 8-bit dynamic codes in blocks of 256 (after subtracting their mean, `offset`),
with one fp32 absmax per 256 blocks: 8.125 instead of 32 bits per 64 weights.

Codes are those bitsandbytes writes for the same tensor (tests/quant check it), so a weight
quantized here can be computed by bitsandbytes' kernels and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from .codebooks import code_4bit, code_dynamic8, pair_table

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


@dataclass
class Quant4bit:
    """A 4-bit quantized tensor: packed codes plus what dequantizing needs."""

    data: torch.Tensor  # uint8 (ceil(n / 2), 1), two codes per byte
    absmax: torch.Tensor  # fp32 (blocks,), or uint8 codes when `offset` is set (double quantization)
    shape: torch.Size
    blocksize: int
    quant_type: str
    offset: torch.Tensor | None = None  # fp32 scalar: mean of the absmax values
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(blocks / 256),)

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"data": self.data, "absmax": self.absmax}
        if self.double_quant:
            out.update(offset=self.offset, nested_absmax=self.nested_absmax)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values scaled into [-1, 1] blockwise, fp32 absmax per block); a last short block is its own."""
    flat = flat.float()
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    # multiply by the reciprocal (not divide): the rounding bitsandbytes uses, so codes agree
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (tail / tail_max).clamp(-1, 1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the nearest value (ties go to the lower value), as int64."""
    order = torch.argsort(code)
    ordered = code[order]
    mids = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(scaled, mids)]


def quantize_blockwise8(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic codes (uint8, x's shape) and fp32 absmax per block."""
    scaled, absmax = _scaled_blocks(x.reshape(-1), blocksize)
    codes = _nearest(scaled, code_dynamic8(x.device)).to(torch.uint8)
    return codes.view(x.shape), absmax


def dequantize_blockwise8(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    values = code_dynamic8(codes.device)[codes.reshape(-1).long()]
    return _times_block_absmax(values, absmax, blocksize).view(codes.shape)


def _times_block_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    full = n - n % blocksize
    out = values[:full].view(-1, blocksize).mul(absmax[: full // blocksize].unsqueeze(1)).view(-1)
    if full < n:
        out = torch.cat([out, values[full:] * absmax[-1]])
    return out


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> Quant4bit:
    """Quantize `w` (any float dtype and shape) to packed 4-bit codes."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if not w.is_floating_point():
        raise ValueError(f"only float tensors can be quantized, got {w.dtype}")
    scaled, absmax = _scaled_blocks(w.detach().reshape(-1), blocksize)
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble holds the code of 0.0
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = _nearest(scaled, code_4bit(quant_type, w.device)).to(torch.uint8)
    data = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    q = Quant4bit(data=data, absmax=absmax, shape=w.shape, blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        q.offset = absmax.mean()
        q.absmax, q.nested_absmax = quantize_blockwise8(absmax - q.offset)
    return q


def block_absmax(q: Quant4bit) -> torch.Tensor:
    """The fp32 absmax of every block (decoded when double quantized)."""
    if not q.double_quant:
        return q.absmax
    return dequantize_blockwise8(q.absmax, q.nested_absmax) + q.offset


def dequantize_4bit(
    q: Quant4bit,
    dtype: torch.dtype = torch.float32,
    start: int = 0,
    stop: int | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    index_buf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Values [start, stop) of the flattened tensor (all of it, in `q.shape`, by default).

    `start` must be a multiple of the blocksize (and so even); pass `absmax` (from `block_absmax`)
    to decode it once for many slices, and `out` (stop - start values of `dtype`) and `index_buf`
    (int32, one per packed byte) to work in buffers you own instead of fresh memory.
    """
    n = prod(q.shape)
    whole = start == 0 and stop is None
    stop = n if stop is None else stop
    if start % q.blocksize:
        raise ValueError(f"start {start} is not a multiple of the blocksize {q.blocksize}")
    absmax = block_absmax(q) if absmax is None else absmax
    packed = q.data.view(-1)[start // 2 : (stop + 1) // 2]
    table = pair_table(q.quant_type, packed.device)
    count = stop - start
    direct = out is not None and dtype == torch.float32 and count == 2 * packed.numel() and count % q.blocksize == 0
    if direct:  # the common case, with no temporary: gather pairs into `out`, scale in place
        index = packed.int() if index_buf is None else index_buf.copy_(packed)
        torch.index_select(table, 0, index, out=out.view(-1, 2))
        out.view(-1, q.blocksize).mul_(absmax[start // q.blocksize : stop // q.blocksize].unsqueeze(1))
        return out
    values = torch.index_select(table, 0, packed.int()).view(-1)[:count]
    b0 = start // q.blocksize
    result = _times_block_absmax(values, absmax[b0 : -(-stop // q.blocksize)], q.blocksize).to(dtype)
    if out is not None:
        return out.copy_(result.view(out.shape))
    return result.view(q.shape) if whole else result
