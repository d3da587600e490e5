"""Which kernel dequantizes 4-bit weights: tuneforge's own (`native`, plain PyTorch, any device)
or bitsandbytes' (`bitsandbytes`, CUDA and, since 0.46, CPU). Both read the same storage layout,
so a layer can switch backends without requantizing; the codes are always made by tuneforge's
quantizer, which writes bitsandbytes' codes (see `quantize`).

`auto` takes bitsandbytes for 4-bit layers where it is installed (its dequantize kernel is ~5x
faster than ours on this project's CPU), else native. The matmuls and what autograd keeps are
tuneforge's either way (linear.py), so memory does not depend on the backend. 8-bit layers always
compute natively: bitsandbytes' int8 path (LLM.int8, with outlier decomposition) is a different
computation; its row-wise codes are the same as ours.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from tuneforge.errors import ConfigError

from .blockwise import Quant4bit, dequantize_4bit, quantize_4bit
from .codebooks import code_4bit
from .int8 import Quant8bit, quantize_int8

BACKENDS = ("auto", "native", "bitsandbytes")


@lru_cache(maxsize=None)
def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve(backend: str, device: torch.device | str, bits: int = 4) -> str:
    """'native' or 'bitsandbytes' for a layer on `device`."""
    if backend not in BACKENDS:
        raise ConfigError(f"quantization_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "bitsandbytes":
        if not bitsandbytes_available():
            raise ConfigError(
                "quantization_backend: bitsandbytes, but bitsandbytes is not installed; "
                "`pip install bitsandbytes` or use quantization_backend: native"
            )
        return "bitsandbytes" if bits == 4 else "native"
    if backend == "auto" and bits == 4 and torch.device(device).type in ("cpu", "cuda") and bitsandbytes_available():
        return "bitsandbytes"
    return "native"


def _bnb():
    import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency (its import warning: tuneforge/__init__)

    return bnb


def quantize(
    w: torch.Tensor, bits: int, quant_type: str, blocksize: int, double_quant: bool, backend: str
) -> Quant4bit | Quant8bit:
    """Codes for `w`. Always tuneforge's quantizer, whatever the backend: its 4-bit codes are
    bitsandbytes' (tests/quant), and its 8-bit absmax codes are always the nearest, where
    bitsandbytes' CPU kernel rounds ~0.1 % of them the other way. One quantizer means the same
    codes on every machine and backend, which LoftQ's rebuild of a base at load time relies on."""
    del backend  # the backend only chooses the dequantize kernel
    if bits == 8:
        return quantize_int8(w)
    return quantize_4bit(w, blocksize, quant_type, double_quant)


def dequantize_4bit_rows(
    q: Quant4bit, r0: int, r1: int, dtype: torch.dtype, absmax: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows [r0, r1) of a 4-bit weight by bitsandbytes' kernel; `absmax` is the decoded fp32
    absmax of every block (blockwise.block_absmax), so any block-aligned slice can be passed."""
    cols = q.shape[1]
    start, stop = r0 * cols, r1 * cols
    if cols % q.blocksize and q.data.device.type == "cpu":
        # bitsandbytes 0.50's CPU kernel decodes blocks per row: rows whose length is not a
        # multiple of the blocksize come out wrong (tests/quant caught it), so ours does those
        flat = dequantize_4bit(q, dtype, start, stop, absmax, out=None if out is None else out.view(-1))
        return flat.view(r1 - r0, cols)
    F = _bnb().functional
    data = q.data.view(-1)[start // 2 : (stop + 1) // 2].unsqueeze(1)
    blocks = absmax[start // q.blocksize : -(-stop // q.blocksize)]
    state = F.QuantState(
        absmax=blocks, shape=torch.Size((r1 - r0, cols)), code=code_4bit(q.quant_type, data.device),
        blocksize=q.blocksize, quant_type=q.quant_type, dtype=dtype,
    )
    if out is not None and data.device.type != "cpu":  # its CPU kernel has no out= variant
        return F.dequantize_4bit(data, state, out=out)
    return F.dequantize_4bit(data, state)
