"""LoRA variants: what makes one LoRA adapter differ from plain LoRA, as objects picked per adapter.

The idea is peft's `LoraVariant`. When an adapter is added, `select_variants(cfg)` asks every
registered variant class whether the adapter's config wants it (`LoraVariant.select(cfg)` returns an
object or None); the tuple of objects is stored on each of its layers (`layer.lora_variants[name]`).
The generic LoRA code (lora.py and the layer types) calls their hooks and names none of them:

    check(layer_cls, module, path)   ConfigError when this layer type cannot take the variant
                                     (called before any module changes, and again when adding)
    scaling(r, alpha)                the adapter's scaling, or None for plain `alpha / r` (rsLoRA)
    init(layer, name)                fill A and B; True when done (the first variant saying True
                                     wins: PiSSA / OLoRA, or the random inits, which come last)
    after_init(layer, name)          once A, B and the scaling exist (DoRA's magnitude)
    release(layer, name)             the adapter leaves the layer unmerged (PiSSA gives the weight back)
    delta(layer, name, delta)        the adapter's weight update `s B A`, transformed (what merging
                                     adds, and what DoRA normalises)
    extra_tensors(layer, name)       the variant's own tensors of adapter `name`, by peft key suffix
    file_tensors(layer, name, tensors)   what save_adapter writes for adapter `name`, given its
                                     `peft_tensors` (default: them unchanged; a LoRA ensemble folds
                                     its member weights into B, lora_ensemble.py)
    combine_refusal(names)           why combine_adapters cannot combine adapters `names` of this
                                     variant, or None (default: None for variants that change
                                     neither the forward, the merge nor `delta`)
    owns_forward: add_adapters(layer, x, out, names)
                                     a forward that is not `out + s B A x`: `out` plus a group of
                                     adapters holding at least one of this variant's (one such
                                     variant per adapter; adapters of different ones run one by one)
    additive = False: merged_weight(layer, todo) / unmerged_weight(layer, names)
                                     merging is not adding `delta` (DoRA rescales rows): the variant
                                     merges and unmerges the whole stack (others by their `delta`)

Class-level declarations: `param_dicts` (nn.ParameterDict attributes the variant adds to every LoRA
layer, keyed by adapter name, e.g. DoRA's `lora_magnitude_vector`), `state_attrs` (per-layer caches
it keeps; removed with the adapters), `kind` ('init', 'scaling', 'maths' or another word: used to
swap an adapter's init object, see LoraLayer.restart_adapter) and `last` (selected after the others:
the default inits, so that another registered init wins).

Adding a variant is a subclass plus `register_variant(MyVariant)`; lora.py does not change.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.errors import ConfigError


class LoraVariant:
    """One aspect of a LoRA adapter; every hook defaults to plain LoRA's behaviour."""

    key = ""  # short name, e.g. 'dora', 'rslora', 'pissa'
    kind = ""  # 'init', 'scaling', 'maths', ...
    describe = ""  # a word for the layer's repr ('' shows nothing)
    param_dicts: tuple[str, ...] = ()
    state_attrs: tuple[str, ...] = ()
    owns_forward = False
    additive = True
    last = False

    @classmethod
    def select(cls, cfg: Any) -> LoraVariant | None:
        """The variant object adapter config `cfg` asks for, or None (override)."""
        return None

    @classmethod
    def setup_layer(cls, layer) -> None:
        """Called once when a module becomes a LoRA layer: create `state_attrs` (param_dicts exist already)."""

    def check(self, layer_cls: type, module, path: str) -> None:
        """ConfigError when `module` (about to be a `layer_cls`) cannot carry this variant."""

    def scaling(self, r: int, alpha: float) -> float | None:
        return None

    def init(self, layer, name: str) -> bool:
        return False

    def after_init(self, layer, name: str) -> None:
        pass

    def release(self, layer, name: str) -> None:
        pass

    def on_new_base(self, layer) -> None:
        """The base weight was rebuilt (quantized / dequantized): drop what was cached from it."""

    def delta(self, layer, name: str, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def extra_tensors(self, layer, name: str) -> dict[str, torch.Tensor]:
        return {}

    def file_tensors(self, layer, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def combine_refusal(self, names: list[str]) -> str | None:
        plain = self.additive and not self.owns_forward and type(self).delta is LoraVariant.delta
        if plain:
            return None
        return f"adapters {names} use the LoRA variant {self.key!r}, which combine_adapters cannot combine"

    # ---- only for variants that own the forward / are not additive -------------------------------
    def add_adapters(self, layer, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` (the running output for input `x`) plus adapters `names`, in order."""
        raise NotImplementedError

    def merged_weight(self, layer, todo: list[str]) -> tuple[torch.Tensor, Any]:
        """(fp32 weight with adapters `todo` merged on top of the current one, a callable that keeps
        what unmerging will need; it is called once the weight is written)."""
        raise NotImplementedError

    def unmerged_weight(self, layer, names: list[str] | None) -> tuple[torch.Tensor, list[str]]:
        """(fp32 weight without the merged adapters `names` (all by default), the names removed)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


_VARIANTS: list[type[LoraVariant]] = []


def register_variant(cls: type[LoraVariant]) -> type[LoraVariant]:
    """Make `cls` selectable for every LoRA adapter added from now on (usable as a class decorator).

    Registering a class with the same `key` again replaces it.
    """
    if not (isinstance(cls, type) and issubclass(cls, LoraVariant)) or not cls.key:
        raise TypeError(f"{cls!r} must be a LoraVariant subclass with a key")
    _VARIANTS[:] = [v for v in _VARIANTS if v.key != cls.key]
    _VARIANTS.append(cls)
    return cls


def unregister_variant(key: str) -> None:
    """Forget the variant registered under `key` (adapters that already use it keep their objects)."""
    _VARIANTS[:] = [v for v in _VARIANTS if v.key != key]


def registered_variants() -> list[type[LoraVariant]]:
    """Variant classes in selection order (those marked `last` at the end)."""
    return [v for v in _VARIANTS if not v.last] + [v for v in _VARIANTS if v.last]


def select_variants(cfg: Any) -> tuple[LoraVariant, ...]:
    """The variant objects adapter config `cfg` asks for; ConfigError when two would own the forward."""
    chosen = tuple(v for v in (cls.select(cfg) for cls in registered_variants()) if v is not None)
    maths = [v.key for v in chosen if v.owns_forward]
    if len(maths) > 1:
        raise ConfigError(f"LoRA variants {maths} each change the adapter's forward; an adapter can use one of them")
    return chosen


def variant_param_dicts() -> tuple[str, ...]:
    out: list[str] = []
    for cls in _VARIANTS:
        out += [d for d in cls.param_dicts if d not in out]
    return tuple(out)


def variant_state_attrs() -> tuple[str, ...]:
    return tuple(a for cls in _VARIANTS for a in cls.state_attrs)


class RegistryTuple:
    """A class attribute `base + (what the registered variants declare)`, read at use time, so a
    variant registered after the layer classes were made still counts (class and instance access)."""

    def __init__(self, base: tuple[str, ...], extra) -> None:
        self.base, self.extra = base, extra

    def __get__(self, obj, owner=None) -> tuple[str, ...]:
        return self.base + tuple(a for a in self.extra() if a not in self.base)
