"""dtype names and 'auto' (ground floor: imports nothing of tuneforge but its errors), shared by
models.py (loading) and quant/ (compute dtypes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ModelError

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cpu_flags() -> str:
    """/proc/cpuinfo's text ('' where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def bf16_is_fast(device: torch.device | str = "cpu", flags: Callable[[], str] = cpu_flags) -> bool:
    """True on CUDA devices with bf16 and on CPUs with native bf16 instructions (`flags` reads the CPU's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        text = flags()
        return "avx512_bf16" in text or "amx_bf16" in text
    return False


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu",
                  flags: Callable[[], str] = cpu_flags) -> torch.dtype:
    """'auto' means fp32 on CPUs without native bf16 (bf16 matmuls there are ~100x slower) and
    bf16 on accelerators that support it. ModelError for an unknown name."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if bf16_is_fast(device, flags) else torch.float32
    if name not in DTYPE_NAMES:
        raise ModelError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[name]
