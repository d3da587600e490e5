"""`LoraConfig`: peft's field names and defaults, validated on construction (`ConfigError`)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tuneforge.errors import ConfigError

from .inits import check_init, is_weight_init

BIAS_MODES = ("none", "all", "lora_only")
# Values of `init_lora_weights` this version implements ("pissa_niter_<N>" stands for any N >= 1;
# PiSSA / OLoRA live in inits.py). peft's other inits (loftq, eva, corda, orthogonal, ...) need data
# or quantization; they arrive with their own files.
SUPPORTED_INITS = (True, False, "gaussian", "pissa", "pissa_niter_<N>", "olora")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter; names, meanings and defaults follow peft's `LoraConfig`."""

    r: int = 8
    """Rank of the update `B @ A`."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by `lora_alpha / r` (`/ sqrt(r)` with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout probability applied to the adapter's input while training."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes (exact name or name ending in '.' + key), a regex (full match),
    or 'all-linear' (every Linear / Conv1D except the output head)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes as in `target_modules`, or a regex (full match)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter, e.g. ['lm_head']."""
    bias: str = "none"
    """Which biases train with the adapter: 'none', 'all', or 'lora_only' (biases of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scaling = lora_alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trained magnitude per output row times the normalised
    direction `W + scaling * B @ A`."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zeros (the adapter starts as a no-op); 'gaussian': A ~ N(0, 1/r),
    B zeros; False: A and B both random (for tests). 'pissa' (full SVD), 'pissa_niter_N' (randomised
    SVD, N power iterations) and 'olora' (QR) move the weight's principal rank-r part into the adapter
    and leave the residual in the base weight (Linear / Conv1D layers only)."""
    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out), as transformers' Conv1D does.
    Decided per layer from its type; a value that disagrees only warns (as peft)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. 'layers', 'h'); needs `layers_to_transform`."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched against the end of the module name: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex matched against the end of the module name: alpha}."""
    loftq_config: dict[str, Any] = field(default_factory=dict)
    """Set by LoftQ (tuneforge.adapters.loftq), not by hand: the quantized base the adapter started on
    ({'loftq_bits', 'loftq_iter', ...}, peft's field name); empty for any other adapter."""

    def __post_init__(self) -> None:
        self.r = _positive_int("r", self.r)
        self.lora_alpha = _positive_number("lora_alpha", self.lora_alpha)
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        self.lora_dropout = float(self.lora_dropout)
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {list(BIAS_MODES)}, got {self.bias!r}")
        for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in ("true", "false", "gaussian", "olora"):
            init = {"true": True, "false": False}.get(init.lower(), init.lower())
        check_init(init)
        if not is_weight_init(init) and not any(
            init is s or (isinstance(s, str) and init == s) for s in SUPPORTED_INITS
        ):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported yet; "
                f"use one of {list(SUPPORTED_INITS)}"
            )
        self.init_lora_weights = init
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = self.layers_pattern or None
        elif self.layers_pattern is not None:
            self.layers_pattern = _names_or_regex("layers_pattern", list(self.layers_pattern)) or None
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ConfigError(
                "layers_to_transform / layers_pattern cannot be used when target_modules is a regex string "
                f"({self.target_modules!r}); put the layer index into the regex or pass a list of names"
            )
        if self.target_modules == ALL_LINEAR and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ConfigError(
                "layers_to_transform / layers_pattern cannot be combined with target_modules='all-linear' "
                "(peft rejects it too); list the module names instead, e.g. ['q_proj', 'v_proj', ...]"
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither")
        self.rank_pattern = _pattern_dict("rank_pattern", self.rank_pattern, _positive_int)
        self.alpha_pattern = _pattern_dict("alpha_pattern", self.alpha_pattern, _positive_number)
        if self.loftq_config is None:
            self.loftq_config = {}
        if not isinstance(self.loftq_config, dict):
            raise ConfigError(f"loftq_config must be a dict, got {type(self.loftq_config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(key: str, v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{key} must be a positive integer (the LoRA rank), got {v!r}")
    return v


def _positive_number(key: str, v: Any) -> float:
    if not _is_number(v) or v <= 0:
        raise ConfigError(f"{key} must be a positive number, got {v!r}")
    return v


def _names_or_regex(key: str, v: Any) -> list[str] | str | None:
    if v is None:
        return None
    if isinstance(v, str):
        if not v:
            raise ConfigError(f"{key} must not be an empty string")
        if v.lower() == ALL_LINEAR:
            return ALL_LINEAR if key == "target_modules" else _bad_all_linear(key)
        _check_regex(key, v)
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
        bad = [x for x in items if not isinstance(x, str) or not x]
        if bad:
            raise ConfigError(f"{key} must hold non-empty strings, got {bad!r}")
        return items
    raise ConfigError(f"{key} must be a list of module names or a regex string, got {type(v).__name__}")


def _bad_all_linear(key: str):
    raise ConfigError(f"'all-linear' is only valid for target_modules, not {key}")


def _check_regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}={pattern!r} is not a valid regex: {e}") from None


def _layer_indices(v: Any) -> list[int] | int | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            raise ConfigError(f"layers_to_transform must be >= 0, got {v}")
        return v
    if isinstance(v, (list, tuple)):
        if not v:
            return None  # peft treats an empty list as "all layers"
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in v):
            raise ConfigError(f"layers_to_transform must hold layer indices >= 0, got {list(v)!r}")
        return list(v)
    raise ConfigError(f"layers_to_transform must be an int or a list of ints, got {v!r}")


def _pattern_dict(key: str, v: Any, check) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a dict {{module name pattern: value}}, got {type(v).__name__}")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{key} keys must be non-empty strings, got {k!r}")
        _check_regex(key, k)
        out[k] = check(f"{key}[{k!r}]", val)
    return out
