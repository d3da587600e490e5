"""Quantize a model's frozen Linear layers in place, and turn them back into plain Linears.

`quantize_model(model, bits=4)` replaces every nn.Linear (except the output head and layers the
caller skips) by a `QuantLinear` holding NF4 / FP4 / int8 codes. `dequantize_model` is the way
back, for merging and export: it gives each layer an fp weight equal to what the quantized layer
computed.

This package knows quantized weights and nothing of adapters. A layer that holds trained state
over its base (an adapter layer) keeps it through either swap by two duck-typed methods:
`layer.carry_onto(new_base)` returns `new_base` carrying that state (called with the new
QuantLinear / Linear), and `layer.fp32_parameters()` lists the parameters `cast_unquantized`
leaves alone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tuneforge.dtypes import resolve_dtype
from tuneforge.errors import ConfigError

from . import backends
from .blockwise import BLOCKSIZES
from .linear import QuantLinear

log = logging.getLogger("tuneforge")

QUANT_TYPES = ("nf4", "fp4")
# kept in full precision, as transformers' bitsandbytes integration does: the output head is
# small next to the rest and its error lands directly on the logits
DEFAULT_SKIP = ("lm_head",)


@dataclass
class QuantizationConfig:
    bits: int = 4
    quant_type: str = "nf4"  # 4-bit only: nf4 | fp4
    double_quant: bool = True  # 4-bit only: absmax values stored in 8 bits
    blocksize: int = 64  # 4-bit only
    compute_dtype: str = "auto"  # auto: fp32 on CPUs without fast bf16, bf16 elsewhere
    backend: str = "auto"  # auto | native | bitsandbytes
    skip_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization_bit must be 4 or 8, got {self.bits}")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quantization_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"quantization blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.backend not in backends.BACKENDS:
            raise ConfigError(
                f"quantization_backend must be one of {', '.join(backends.BACKENDS)}, got {self.backend!r}"
            )
        _compute_dtype(self.compute_dtype, "cpu")  # validates the name

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit int8 (row-wise absmax)"
        dq = ", double quantization" if self.double_quant else ""
        return f"4-bit {self.quant_type} (blocks of {self.blocksize}{dq})"


def _compute_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    try:
        return resolve_dtype(name, device)
    except Exception as exc:  # resolve_dtype raises ModelError; this is a config problem
        raise ConfigError(f"compute_dtype: {exc}") from None


def _skipped(path: str, skip: list[str]) -> bool:
    return any(path == s or path.endswith("." + s) or path.startswith(s + ".") for s in skip)


def quantizable_linears(model: nn.Module, skip: list[str] | tuple[str, ...] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """(path, module) of the Linear layers `quantize_model` would replace."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and not _skipped(path, list(skip)):
            out.append((path, m))
    return out


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
    backend: str = "auto",
    blocksize: int = 64,
    skip_modules: list[str] | tuple[str, ...] | None = None,
    config: QuantizationConfig | None = None,
) -> nn.Module:
    """Replace the model's frozen Linear weights by quantized codes, in place; returns `model`.

    The output head (`lm_head`) and `skip_modules` stay as they are, and so does any Linear whose
    weight is tied to another module (quantizing it would untie it).
    """
    cfg = config or QuantizationConfig(
        bits=bits, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
        compute_dtype=compute_dtype if isinstance(compute_dtype, str) else str(compute_dtype).replace("torch.", ""),
        backend=backend, skip_modules=list(DEFAULT_SKIP if skip_modules is None else skip_modules),
    )
    tied = _shared_weights(model)
    count = 0
    for path, linear in quantizable_linears(model, cfg.skip_modules):
        if id(linear.weight) in tied:
            log.info("not quantizing %s: its weight is shared with another module", path)
            continue
        if linear.weight.requires_grad and linear.weight.grad is not None:
            raise ConfigError(f"{path} has a gradient: only frozen weights are quantized")
        _replace(model, path, quantize_linear(linear, cfg))
        count += 1
    model.tuneforge_quantization = cfg
    log.info("quantized %d linear layers to %s", count, cfg.describe())
    return model


def quantize_linear(linear: nn.Linear, cfg: QuantizationConfig, weight: torch.Tensor | None = None) -> QuantLinear:
    """`linear` as a QuantLinear; a layer with state over its base (`carry_onto`) keeps it over the
    quantized base."""
    device = linear.weight.device
    backend = backends.resolve(cfg.backend, device, cfg.bits)
    q = QuantLinear.from_linear(
        linear, cfg.bits, cfg.quant_type, cfg.blocksize, cfg.double_quant,
        _compute_dtype(cfg.compute_dtype, device), backend, weight=weight,
    )
    q = _carried(linear, q)
    q.train(linear.training)
    return q


def _carried(old: nn.Module, new: nn.Module) -> nn.Module:
    carry = getattr(old, "carry_onto", None)
    return carry(new) if callable(carry) else new


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every QuantLinear back to an nn.Linear whose weight is its dequantized codes (in place).

    Layers with state over their base (`carry_onto`: adapters) keep it over the plain Linear,
    where they can merge.
    """
    for path, m in [(p, m) for p, m in model.named_modules() if isinstance(m, QuantLinear)]:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(m.dequantize(dtype), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=m.bias.requires_grad)
        lin = _carried(m, lin)
        lin.train(m.training)
        _replace(model, path, lin)
    if hasattr(model, "tuneforge_quantization"):
        # remembered so that adapters trained on the quantized base still match it (provenance.py)
        model.tuneforge_dequantized_from = model.tuneforge_quantization
        del model.tuneforge_quantization
    return model


def quantization_of(model: nn.Module) -> QuantizationConfig | None:
    """The config `quantize_model` applied, or None for a model without quantized layers."""
    cfg = getattr(model, "tuneforge_quantization", None)
    if cfg is None and any(isinstance(m, QuantLinear) for m in model.modules()):
        cfg = QuantizationConfig()  # quantized layer by layer: describe the defaults
    return cfg


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized weights hold, bytes the same weights take in bf16)."""
    held = bf16 = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            held += m.nbytes()
            bf16 += 2 * m.in_features * m.out_features
    return held, bf16


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters outside QuantLinear layers and adapters (model.to(dtype) would cast
    their scales too; adapter layers list theirs by `fp32_parameters()`).

    Each gets its own memory even when the dtype is already right: transformers leaves weights
    in a memory map of the checkpoint file, and one remaining tensor keeps the whole map (all
    the fp weights just quantized) resident.
    """
    # adapter tensors are left alone: they train in fp32 whatever the base computes in
    seen = {id(p) for m in model.modules() if callable(getattr(m, "fp32_parameters", None))
            for p in m.fp32_parameters()}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            continue
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.is_floating_point():
                p.data = p.data.to(dtype, copy=True)  # .data: a tied parameter stays one object
