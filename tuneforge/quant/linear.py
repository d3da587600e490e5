"""`QuantLinear`: a frozen Linear whose weight lives in 4-bit (NF4/FP4) or 8-bit codes.

The weight is dequantized block by block inside the matmul, in forward and again in backward, and
never kept: autograd saves nothing of it (and not the input either, since the weight takes no
gradient), so the layer holds only its codes between steps. Only the input gets a gradient; LoRA /
DoRA adapters on top (adapters/lora.py) train as on an nn.Linear.

`weight` gives a dequantized copy for code that reads the weight (DoRA norms, export); writing to
that copy changes nothing, so merging adapters into a QuantLinear is refused (dequantize first).
"""

from __future__ import annotations

from math import gcd

import torch
from torch import nn

from . import backends
from .blockwise import Quant4bit, block_absmax, dequantize_4bit
from .int8 import Quant8bit, dequantize_int8

# values dequantized at once; larger weights go in row chunks, bounding the temporary copy
CHUNK_VALUES = 1 << 22


# One scratch buffer per (device, dtype), shared by every QuantLinear: the dequantized rows live
# only for the matmul that reads them, so reusing one buffer keeps the allocator from churning
# (fresh multi-MB temporaries per layer made glibc keep hundreds of MB it had freed).
_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    key = (device, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W.T with W recomputed from its codes in backward instead of saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer._matmul_transposed(grad), None


class QuantLinear(nn.Module):
    """y = x @ dequant(codes).T + bias, computed in `compute_dtype`, returned in x's dtype."""

    def merge_refusal(self) -> str:
        """Why an adapter cannot merge into this layer (what every adapter method's quantized layer
        returns from `cannot_merge`)."""
        kind = f"{self.bits}-bit {self.quant_type if self.bits == 4 else 'int8'}"
        return (f"its base weight is quantized ({kind}); merging would requantize and lose the update. "
                "Call tuneforge.dequantize_model(model) first, or use `tuneforge export`, which does")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        backend: str = "native",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.quant_type, self.blocksize = bits, quant_type, blocksize
        self.double_quant = bool(double_quant) and bits == 4
        self.compute_dtype = compute_dtype
        self.backend = backend
        # empty codes of the right shapes; from_linear / load_state_dict fill them
        n = in_features * out_features
        if bits == 4:
            blocks = -(-n // blocksize)
            self.register_buffer("qweight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
            if self.double_quant:
                self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
                self.register_buffer("nested_absmax", torch.zeros(-(-blocks // 256), device=device))
                self.register_buffer("absmax_offset", torch.zeros((), device=device))
            else:
                self.register_buffer("absmax", torch.zeros(blocks, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("absmax", torch.zeros(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._rows_per_chunk = self._chunk_rows()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        backend: str = "native",
        weight: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize `linear` (or `weight` in its place, e.g. LoftQ's residual base)."""
        w = linear.weight if weight is None else weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, bits, quant_type, blocksize,
            double_quant, compute_dtype or torch.float32, backend, device="meta",
        )
        layer.set_codes(backends.quantize(w, bits, quant_type, blocksize, layer.double_quant, backend))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_codes(self, q: Quant4bit | Quant8bit) -> None:
        self.qweight = q.data
        self.absmax = q.absmax
        if isinstance(q, Quant4bit) and q.double_quant:
            self.nested_absmax = q.nested_absmax
            self.absmax_offset = q.offset
        self._dora_cache = {}

    def codes(self) -> Quant4bit | Quant8bit:
        if self.bits == 8:
            return Quant8bit(self.qweight, self.absmax)
        shape = torch.Size((self.out_features, self.in_features))
        q = Quant4bit(self.qweight, self.absmax, shape, self.blocksize, self.quant_type)
        if self.double_quant:
            q.offset, q.nested_absmax = self.absmax_offset, self.nested_absmax
        return q

    # ---- dequantization ------------------------------------------------------------------------
    def _chunk_rows(self) -> int:
        rows = max(1, CHUNK_VALUES // max(self.in_features, 1))
        if self.bits == 4:  # a chunk must start on a block boundary
            align = self.blocksize // gcd(self.blocksize, self.in_features)
            rows = max(align, rows - rows % align)
        return min(rows, self.out_features)

    def _row_chunks(self, dtype: torch.dtype, scratch: bool = False):
        """(first row, stop row, dequantized rows) covering the weight.

        `scratch`: the rows go into the shared workspace, valid until the next chunk is made
        (the matmuls use them at once); otherwise each chunk is fresh memory.
        """
        q = self.codes()
        absmax = block_absmax(q) if self.bits == 4 else None  # decoded once for all chunks
        step = self._rows_per_chunk
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            out = _workspace((r1 - r0, self.in_features), dtype, self.qweight.device) if scratch else None
            yield r0, r1, self._dequantize_rows(q, r0, r1, dtype, absmax, out)

    def _dequantize_rows(self, q, r0: int, r1: int, dtype: torch.dtype, absmax, out) -> torch.Tensor:
        if self.bits == 8:
            return dequantize_int8(q, dtype, r0, r1, out=out)
        if self.backend != "native":
            return backends.dequantize_4bit_rows(q, r0, r1, dtype, absmax, out=out)
        index = None if out is None else _workspace(((r1 - r0) * self.in_features // 2,), torch.int32, out.device)
        flat = dequantize_4bit(q, dtype, r0 * self.in_features, r1 * self.in_features, absmax,
                               out=None if out is None else out.view(-1), index_buf=index)
        return flat.view(r1 - r0, self.in_features)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight (out, in) in `dtype` (compute_dtype by default)."""
        dtype = dtype or self.compute_dtype
        if self._rows_per_chunk >= self.out_features:
            return next(self._row_chunks(dtype))[2]
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        for r0, r1, rows in self._row_chunks(dtype):
            out[r0:r1] = rows
        return out

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    # ---- compute -------------------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows_per_chunk >= self.out_features:
            return x @ next(self._row_chunks(x.dtype, scratch=True))[2].t()
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for r0, r1, rows in self._row_chunks(x.dtype, scratch=True):
            out[..., r0:r1] = x @ rows.t()
        return out

    def _matmul_transposed(self, grad: torch.Tensor) -> torch.Tensor:
        acc = None
        for r0, r1, rows in self._row_chunks(grad.dtype, scratch=True):
            part = grad[..., r0:r1] @ rows
            acc = part if acc is None else acc.add_(part)
        return acc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            compute = torch.get_autocast_dtype(x.device.type)
        else:
            compute = self.compute_dtype
        with torch.autocast(x.device.type, enabled=False):
            out = _QuantMatmul.apply(x.to(compute), self)
            if self.bias is not None:
                out = out + self.bias.to(compute)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(in_dtype)

    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes and scales; bias not counted)."""
        return self.codes().nbytes()

    def extra_repr(self) -> str:
        kind = f"{self.quant_type}{', double_quant' if self.double_quant else ''}" if self.bits == 4 else "int8"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}, backend={self.backend}"
        )
