"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"): start a QLoRA adapter so
that the quantized base *plus* the adapter approximates the original weight, not the base alone.

For a weight W (out, in), rank r and LoRA scaling s, alternate for t = 1..N (s B_0 A_0 = 0):

    Q_t       = quant(W - s B_{t-1} A_{t-1})
    s B_t A_t = rank-r truncated SVD of W - dequant(Q_t)     (sqrt(S) split between A and B, B / s)

so ||W - dequant(Q_N) - s B_N A_N|| is below plain quantization's error and falls with N. The layer
then stores the codes Q_N and the adapter starts at (A_N, B_N).

The codes come from tuneforge's own quantizer for the layer's config (backends.quantize), applied
to the very tensor the QuantLinear is built from, so they are bit for bit what the layer stores.
The SVD is exact (torch.linalg.svd), so the same W always gives the same base: a resumed run and a
later chat / export rebuild it from the original weights instead of storing it.

The adapter's config records it (`loftq_config`, peft's field name: loftq_bits, loftq_iter, plus the
4-bit layout and the weight dtype). `init_lora_weights` stays true in adapter_config.json: peft's
"loftq" would re-run peft's own LoftQ at load (CUDA only, another quantizer, scaling ignored), so
peft loads the file as a plain adapter and, on the base `dequantize_model` gives, computes the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.fileio import read_json
from tuneforge.quant import backends
from tuneforge.quant.blockwise import Quant4bit, dequantize_4bit
from tuneforge.quant.int8 import Quant8bit, dequantize_int8
from tuneforge.quant.model import (
    QuantizationConfig,
    _replace,
    _shared_weights,
    _skipped,
    cast_unquantized,
    quantize_linear,
    quantize_model,
)

from . import dora
from .core import lora_layers, refresh_trainable, require_state
from .peft_format import load_adapter

log = logging.getLogger("tuneforge")

# set by models.load_model_and_tokenizer(defer_quantization=True): the config, and the dtype the
# layers left in full precision are cast to once quantized (weights load in the checkpoint's dtype)
PENDING, PENDING_DTYPE = "tuneforge_pending_quantization", "tuneforge_pending_dtype"


# ---- maths --------------------------------------------------------------------------------------
def _quantize(w: torch.Tensor, qcfg: QuantizationConfig, backend: str) -> Quant4bit | Quant8bit:
    # the arguments QuantLinear.from_linear passes, so its codes equal these
    double = bool(qcfg.double_quant) and qcfg.bits == 4
    return backends.quantize(w, qcfg.bits, qcfg.quant_type, qcfg.blocksize, double, backend)


def _dequantize(q: Quant4bit | Quant8bit) -> torch.Tensor:
    return dequantize_int8(q) if isinstance(q, Quant8bit) else dequantize_4bit(q, torch.float32)


@torch.no_grad()
def _decompose(W: torch.Tensor, r: int, scaling: float, qcfg: QuantizationConfig, iters: int, backend: str):
    """(codes, A, B, the fp32 tensor the codes quantize)."""
    w = W.detach().float()
    out_f, in_f = w.shape
    A, B = w.new_zeros(r, in_f), w.new_zeros(out_f, r)
    target = w
    for t in range(max(iters, 1)):
        q = _quantize(target, qcfg, backend)
        if iters == 0:
            break
        U, S, Vh = torch.linalg.svd(w - _dequantize(q), full_matrices=False)
        k = min(r, S.numel())
        root = S[:k].sqrt()
        A = w.new_zeros(r, in_f)
        B = w.new_zeros(out_f, r)
        A[:k] = root.unsqueeze(1) * Vh[:k]
        B[:, :k] = U[:, :k] * (root / scaling)
        if t + 1 < iters:  # the next residual base: W minus the adapter's delta s B A
            target = w - (U[:, :k] * S[:k]) @ Vh[:k]
    return q, A, B, target


def loftq_decompose(
    W: torch.Tensor, r: int, scaling: float, qcfg: QuantizationConfig, iters: int
) -> tuple[Quant4bit | Quant8bit, torch.Tensor, torch.Tensor]:
    """(codes Q, A (r, in), B (out, r)) with dequant(Q) + scaling * B @ A ~ W; fp32 A and B.

    iters=0 is plain quantization with A = B = 0.
    """
    if iters < 0:
        raise ConfigError(f"loftq_iter must be >= 0, got {iters}")
    backend = backends.resolve(qcfg.backend, W.device, qcfg.bits)
    q, A, B, _ = _decompose(W, r, scaling, qcfg, iters, backend)
    return q, A, B


# ---- model --------------------------------------------------------------------------------------
def _loftq_layers(model: nn.Module, name: str, qcfg: QuantizationConfig):
    """LoRA layers over a plain nn.Linear carrying adapter `name` that quantize_model would quantize."""
    tied = _shared_weights(model)
    out = []
    for path, m in lora_layers(model, name):
        if m._lora_base_class is not nn.Linear or _skipped(path, list(qcfg.skip_modules)):
            continue
        if id(m.weight) in tied:  # quantize_model keeps such a Linear in full precision too
            continue
        out.append((path, m))
    return out


@torch.no_grad()
def apply_loftq(model: nn.Module, adapter_name: str, qcfg: QuantizationConfig, iters: int) -> nn.Module:
    """Quantize `model` (in place) with adapter `adapter_name` initialised by LoftQ; returns it.

    Every adapted nn.Linear gets its LoftQ codes and (A, B) (DoRA magnitudes are re-initialised
    on the new base); every other Linear is quantized as quantize_model does.
    """
    if iters < 0:
        raise ConfigError(f"loftq_iter must be >= 0, got {iters}")
    st = require_state(model, adapter_name)
    for path, layer in _loftq_layers(model, adapter_name, qcfg) if iters else []:
        W = layer.weight.detach()
        backend = backends.resolve(qcfg.backend, W.device, qcfg.bits)
        _, A, B, target = _decompose(W, layer.lora_r[adapter_name], layer.lora_scaling[adapter_name],
                                     qcfg, iters, backend)
        layer.lora_A[adapter_name].copy_(A)
        layer.lora_B[adapter_name].copy_(B)
        new = quantize_linear(layer, qcfg, weight=target)  # quantizes `target` again: the same codes
        if adapter_name in new.lora_magnitude_vector:  # DoRA: m = ||dequant(Q) + s B A|| per row
            trainable = new.lora_magnitude_vector[adapter_name].requires_grad
            dora.init_magnitude(new, adapter_name)
            new.lora_magnitude_vector[adapter_name].requires_grad_(trainable)
        _replace(model, path, new)
    quantize_model(model, config=qcfg)
    refresh_trainable(model)  # quantize_linear gives biases new (frozen) Parameters
    if iters:
        st.configs[adapter_name].loftq_config = _record(qcfg, iters)
    return model


def _record(qcfg: QuantizationConfig, iters: int) -> dict:
    rec = {"loftq_bits": qcfg.bits, "loftq_iter": int(iters)}
    if qcfg.bits == 4:
        rec.update(quant_type=qcfg.quant_type, blocksize=qcfg.blocksize, double_quant=bool(qcfg.double_quant))
    return rec


# ---- deferred quantization -----------------------------------------------------------------------
def take_pending(model: nn.Module) -> tuple[QuantizationConfig, torch.dtype | None] | None:
    """(config, dtype) of a quantization `load_model_and_tokenizer` deferred, removed from the model."""
    qcfg, dtype = model.__dict__.pop(PENDING, None), model.__dict__.pop(PENDING_DTYPE, None)
    return None if qcfg is None else (qcfg, dtype)


def finish_pending(model: nn.Module, pending, adapter_name: str | None = None, iters: int = 0) -> nn.Module:
    """Quantize as deferred: LoftQ for adapter `adapter_name` when iters >= 1, else plainly; then
    cast what stays in full precision to the dtype the load asked for (adapter tensors stay fp32)."""
    qcfg, dtype = pending
    if iters:
        apply_loftq(model, adapter_name, qcfg, iters)
    else:
        quantize_model(model, config=qcfg)
    if dtype is not None:
        cast_unquantized(model, dtype)
    return model


# ---- loading a LoftQ adapter ---------------------------------------------------------------------
def loftq_record(adapter_path: str | Path) -> dict:
    """The `loftq_config` of a saved adapter ({} for an adapter that did not start from LoftQ)."""
    try:
        raw = read_json(Path(adapter_path) / "adapter_config.json", "adapter config", ModelError)
    except ModelError:
        return {}  # load_adapter reports unreadable directories in its own words
    if not isinstance(raw, dict) or not isinstance(raw.get("loftq_config"), dict):
        return {}
    # peft's own LoftQ files (init_lora_weights 'loftq') are not ours: load_adapter refuses them
    return raw["loftq_config"] if raw.get("init_lora_weights", True) in (True, "true") else {}


def _describe(rec: dict) -> str:
    if rec.get("loftq_bits") == 8:
        return "8-bit int8"
    return f"4-bit {rec.get('quant_type', 'nf4')} (blocks of {rec.get('blocksize', 64)})"


def refuse_merging(adapter_path: str | Path) -> None:
    """A LoftQ adapter only fits its LoftQ base: merging it into the fp weights would be wrong."""
    rec = loftq_record(adapter_path)
    if rec:
        raise ConfigError(
            f"adapter '{adapter_path}' was trained on a LoftQ base (loftq_iter {rec.get('loftq_iter')}); it can "
            "only be the last entry of adapter_name_or_path, not merged into the original weights"
        )


def load_adapter_for_base(model: nn.Module, adapter_path: str | Path, name: str = "default",
                          trainable: bool = False) -> nn.Module:
    """load_adapter, on the base the adapter was trained with.

    On a model whose quantization was deferred (`defer_quantization`), a LoftQ adapter rebuilds
    its quantized base from the fp weights (LoftQ again, then the file's A/B over the fresh ones);
    any other adapter gets the plain quantized base first.
    """
    rec = loftq_record(adapter_path)
    pending = take_pending(model)
    if not rec:
        if pending is not None:  # the base a plain QLoRA adapter was trained on
            log.warning("adapter '%s' did not start from LoftQ: its base is quantized plainly and "
                        "loftq_iter does not apply to it", adapter_path)
            finish_pending(model, pending)
        return load_adapter(model, adapter_path, name, is_trainable=trainable)
    if pending is None:
        raise ConfigError(
            f"adapter '{adapter_path}' was trained on a LoftQ base ({_describe(rec)}, loftq_iter "
            f"{rec.get('loftq_iter')}) rebuilt from the original weights; set quantization_bit: "
            f"{rec.get('loftq_bits')} and loftq_iter: {rec.get('loftq_iter')} in the config to load it"
        )
    _check_same_quantization(rec, pending[0], adapter_path)
    load_adapter(model, adapter_path, name, is_trainable=trainable)
    trained = {p: {k: t.detach().clone() for k, t in m.peft_tensors(name).items()}
               for p, m in lora_layers(model, name)}
    finish_pending(model, pending, name, int(rec["loftq_iter"]))
    with torch.no_grad():  # the file's weights over LoftQ's starting point
        for p, m in lora_layers(model, name):
            for k, t in m.peft_tensors(name).items():
                t.copy_(trained[p][k])
    return model


def _check_same_quantization(rec: dict, qcfg: QuantizationConfig, adapter_path) -> None:
    want = {"bits": rec.get("loftq_bits"), "quant_type": rec.get("quant_type"),
            "blocksize": rec.get("blocksize"), "double_quant": rec.get("double_quant")}
    have = {"bits": qcfg.bits, "quant_type": qcfg.quant_type, "blocksize": qcfg.blocksize,
            "double_quant": bool(qcfg.double_quant)}
    keys = ("bits",) if want["bits"] == 8 else tuple(k for k in want if want[k] is not None)
    diff = [k for k in keys if want[k] != have[k]]
    if not isinstance(rec.get("loftq_iter"), int) or rec["loftq_iter"] < 1:
        raise ConfigError(f"adapter '{adapter_path}': loftq_config.loftq_iter must be an integer >= 1, "
                          f"got {rec.get('loftq_iter')!r}")
    if diff:
        raise ConfigError(
            f"adapter '{adapter_path}' was trained on a LoftQ base of {_describe(rec)} (double_quant "
            f"{rec.get('double_quant')}) but the config asks for {qcfg.describe()}; set "
            f"quantization_bit / quantization_type / double_quantization as in training"
        )

