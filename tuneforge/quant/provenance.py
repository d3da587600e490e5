"""Which base an adapter was trained on: an adapter trained on a 4/8-bit base works on the fp
base too, but not identically, so a later load onto a different base says so instead of being
silently different. The record is a small file beside peft's, which peft never reads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from ..errors import TuneforgeError
from ..fileio import read_json
from .model import quantization_of

log = logging.getLogger("tuneforge")
RECORD = "base_quantization.json"
_KEYS = ("bits", "quant_type", "double_quant", "blocksize")


def _current(model: nn.Module) -> dict | None:
    cfg = quantization_of(model) or getattr(model, "tuneforge_dequantized_from", None)
    cfg = cfg or getattr(model, "tuneforge_pending_quantization", None)
    return None if cfg is None else {k: getattr(cfg, k) for k in _KEYS}


def record_base(model: nn.Module, adapter_dir: str | Path) -> None:
    """Write the record for an adapter saved from `model` (nothing for an fp base)."""
    current = _current(model)
    if current is not None:
        (Path(adapter_dir) / RECORD).write_text(json.dumps(current, indent=2) + "\n")


def check_base(model: nn.Module, adapter_dir: str | Path) -> None:
    """Warn when the adapter was trained on a quantized base that `model` does not reproduce."""
    path = Path(adapter_dir) / RECORD
    if not path.is_file():
        return
    try:
        trained = read_json(path, "base record")
    except TuneforgeError as exc:  # only a warning: the record is advice, not needed to load
        log.warning("%s; cannot tell which base the adapter was trained on", exc)
        return
    if not isinstance(trained, dict):
        log.warning("base record '%s' is not a JSON object; cannot tell which base the adapter was "
                    "trained on", path)
        return
    current = _current(model)
    if current is None:
        log.warning("adapter %s was trained on a %s-bit %s base, but this model is not quantized: "
                    "its outputs will differ somewhat; set quantization_bit: %s (and the same "
                    "quantization_type) to use the base it was trained with",
                    adapter_dir, trained.get("bits"), trained.get("quant_type"), trained.get("bits"))
    elif any(current.get(k) != trained.get(k) for k in ("bits", "quant_type")):
        log.warning("adapter %s was trained on a %s-bit %s base, this model is %s-bit %s",
                    adapter_dir, trained.get("bits"), trained.get("quant_type"),
                    current["bits"], current["quant_type"])
