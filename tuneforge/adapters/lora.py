"""LoRA layers: `y = base(x) + scaling * (dropout(x) @ A.T) @ B.T`, summed over active adapters.

A LoRA layer is the base module itself with its class swapped to a subclass (`LoraLinear` for
`nn.Linear`, `LoraConv1D` for transformers' `Conv1D`). The module keeps its own `weight` / `bias`,
so the base's state_dict keys do not change; each adapter adds two fp32 parameters beside them,
`<module>.lora_A.<adapter>` (r, in) and `<module>.lora_B.<adapter>` (out, r). Unloading swaps the
class back. Maths and initialisation follow peft exactly.

What differs between LoRA adapters (DoRA, rsLoRA, PiSSA / OLoRA / LoftQ and the random inits) is a
tuple of variant objects per adapter (`lora_variants[name]`, variants.py), picked once from its
config; this code calls their hooks and names none of them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError, ModelError

from .layer import AdapterLayer, Conv1D
from .targets import pattern_value
from .variants import (
    LoraVariant,
    RegistryTuple,
    registered_variants,
    select_variants,
    variant_param_dicts,
    variant_state_attrs,
)

# per-instance attributes a LoRA layer adds (removed again by `strip`)
_STATE_ATTRS = (
    "lora_r",
    "lora_alpha",
    "lora_scaling",
    "lora_dropout",
    "lora_active",
    "lora_merged",
    "lora_disabled",
    "_lora_run",
    "_lora_base_class",
    "_lora_route",
    "lora_variants",  # adapter name -> its variant objects (variants.py)
    "param_dicts",  # this layer's ParameterDicts: A, B and those of the variants it has set up
)


class LoraLayer(AdapterLayer):
    """Mixin placed before the base class (`class LoraLinear(LoraLayer, nn.Linear)`).

    Subclasses say how the base stores its weight (`fan_in_fan_out`) and may allow the in-place
    fused add (`inplace_add`) when the base output is never saved for backward. The adapter-layer
    protocol (layer.py) maps onto LoRA's own names below.
    """

    method_name = "lora"
    # class level: A, B and every registered variant's dicts; an instance keeps the ones it made
    param_dicts = RegistryTuple(("lora_A", "lora_B"), variant_param_dicts)
    state_attrs = RegistryTuple(_STATE_ATTRS, variant_state_attrs)
    base_class_attr = "_lora_base_class"
    route_attr = "_lora_route"
    fan_in_fan_out = False
    inplace_add = False
    weight_inits = True  # False: inits that read the weight (PiSSA / OLoRA) give the default start
    quantized_base = False  # True: the base weight is codes, which no init may rewrite
    _lora_route = None  # set per instance by route_adapters (routing.py): one adapter per sample

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict

    # ---- life cycle -------------------------------------------------------------------------
    def lora_setup(self, base_class: type) -> None:
        self._lora_base_class = base_class
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.param_dicts = ("lora_A", "lora_B")
        self.lora_variants: dict[str, tuple[LoraVariant, ...]] = {}
        self.lora_r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.lora_active: tuple[str, ...] = ()
        self.lora_merged: list[str] = []
        self.lora_disabled = False
        self._lora_run: tuple[str, ...] = ()
        self._variant_storage()

    def _variant_storage(self) -> None:
        """Give this layer the ParameterDicts and state of every registered variant it lacks
        (at setup, and again for a variant registered since)."""
        for cls in registered_variants():
            for d in cls.param_dicts:
                if d not in self.param_dicts:
                    setattr(self, d, nn.ParameterDict())
                    self.param_dicts = (*self.param_dicts, d)
            if any(a not in self.__dict__ for a in cls.state_attrs):
                cls.setup_layer(self)

    # ---- the adapter-layer protocol (layer.py) -------------------------------------------------
    def setup(self, base_class: type) -> None:
        self.lora_setup(base_class)

    @classmethod
    def check_config(cls, module: nn.Module, path: str, cfg) -> None:
        cls.check_target(module, path, pattern_value(cfg.rank_pattern, path, cfg.r))
        for v in select_variants(cfg):
            v.check(cls, module, path)

    def add_from_config(self, name: str, cfg, path: str) -> None:
        r = pattern_value(cfg.rank_pattern, path, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, path, cfg.lora_alpha)
        self.add_variant_lora(name, r, alpha, cfg.lora_dropout, select_variants(cfg))

    @property
    def adapters_disabled(self) -> bool:
        return self.lora_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.lora_disabled = flag

    def merged_adapters(self) -> list[str]:
        return list(self.lora_merged)

    def shape_hint(self, name: str) -> str:
        return f"r={self.lora_r[name]}"

    def delete_adapter(self, name: str) -> None:
        self.delete_lora(name)

    def release_adapter(self, name: str) -> None:
        for v in self.lora_variants.get(name, ()):
            v.release(self, name)  # e.g. PiSSA / OLoRA: the start they took out of the weight

    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        return self.merge_lora(names, safe_merge=safe_merge)

    def unmerge(self, names: list[str] | None = None) -> list[str]:
        return self.unmerge_lora(names)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` plus adapters `names` in order: plain LoRA maths here (`_add_lora`, per layer type);
        a group holding adapters of a variant that owns the forward (DoRA) is computed by that variant."""
        owners = [next((v for v in self.lora_variants.get(n, ()) if v.owns_forward), None) for n in names]
        if all(v is None for v in owners):
            return self._add_lora(x, out, names)
        if all(v is not None and type(v) is type(owners[0]) for v in owners):
            return owners[0].add_adapters(self, x, out, names)
        for n in names:  # plain adapters beside forward-owning variants, or several kinds: one at a time
            out = self.add_adapters(x, out, (n,))
        return out

    def _merge_variant(self, names) -> LoraVariant | None:
        """The variant that merges the stack when one of `names` merges other than by adding (DoRA)."""
        for n in names:
            for v in self.lora_variants.get(n, ()):
                if not v.additive:
                    return v
        return None

    def on_new_base(self) -> None:
        for v in {type(v): v for vs in self.lora_variants.values() for v in vs}.values():
            v.on_new_base(self)

    @classmethod
    def check_target(cls, module: nn.Module, path: str, r: int) -> None:
        """Raise ConfigError when `module` (about to get rank `r`) is a shape this layer type cannot adapt.

        Called before any module is changed, so a refused target leaves the model untouched.
        """

    def in_out_features(self) -> tuple[int, int]:
        w = self.weight
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def add_lora(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        init: bool | str,
        use_dora: bool = False,
    ) -> None:
        """Add adapter `name` with LoraConfig's variant options given one by one (ConfigError as add_adapter)."""
        options = SimpleNamespace(use_rslora=use_rslora, init_lora_weights=init, use_dora=use_dora)
        self.add_variant_lora(name, r, alpha, dropout, select_variants(options))

    def add_variant_lora(
        self, name: str, r: int, alpha: float, dropout: float, variants: tuple[LoraVariant, ...]
    ) -> None:
        """Add adapter `name` (rank r, lora_alpha, dropout) shaped by its variant objects (variants.py).

        Raises ConfigError when this layer cannot carry one of the variants (nothing is added then).
        """
        device = self.weight.device
        if device.type == "meta":
            raise ConfigError(f"cannot add LoRA to a module whose weight is on the meta device ({self!r})")
        for v in variants:
            v.check(type(self), self, repr(self))
        self._variant_storage()
        A, B = self.new_lora_tensors(r, device)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_r[name] = r
        self.lora_alpha[name] = alpha
        scalings = [s for s in (v.scaling(r, alpha) for v in variants) if s is not None]
        self.lora_scaling[name] = scalings[0] if scalings else alpha / r
        self.lora_dropout[name] = float(dropout)
        self.lora_variants[name] = tuple(variants)
        # initialisation runs once A, B and the scaling exist: some inits (PiSSA, OLoRA) need them
        try:
            if not any(v.init(self, name) for v in variants):
                raise ConfigError(f"no LoRA variant of adapter {name!r} initialises its weights {variants}")
            for v in variants:  # e.g. DoRA's magnitude, taken after the LoRA init
                v.after_init(self, name)
        except Exception:
            self._forget(name)
            raise
        self._lora_refresh()

    def restart_adapter(self, name: str, init: LoraVariant) -> None:
        """Adapter `name` now starts from `init` (an init variant that already set A and B, e.g.
        LoftQ on a rebuilt base): it replaces the adapter's init object, and the other variants'
        `after_init` runs again (trainability of their tensors kept)."""
        others = tuple(v for v in self.lora_variants[name] if v.kind != "init")
        self.lora_variants[name] = (init, *others)
        trainable = {k: p.requires_grad for k, p in self.adapter_parameters(name).items()}
        for v in others:
            v.after_init(self, name)
        for k, p in self.adapter_parameters(name).items():
            p.requires_grad_(trainable.get(k, p.requires_grad))

    def new_lora_tensors(self, r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised fp32 (A, B) for this layer type: (r, in) and (out, r) for linear layers."""
        in_f, out_f = self.in_out_features()
        A = torch.empty(r, in_f, dtype=torch.float32, device=device)
        B = torch.empty(out_f, r, dtype=torch.float32, device=device)
        return A, B

    def init_lora_weights(self, name: str, init: bool | str) -> None:
        """Fill adapter `name`'s A and B with peft's random start for this layer type (True, False,
        'gaussian'); ConfigError for other values."""
        init_lora(self.lora_A[name].data, self.lora_B[name].data, self.lora_r[name], init)

    def delete_lora(self, name: str) -> None:
        if name in self.lora_merged:
            self.unmerge_lora([name])
        for v in self.lora_variants.get(name, ()):
            v.release(self, name)  # e.g. PiSSA / OLoRA: give the base its original weight back
        self._forget(name)
        self.lora_active = tuple(n for n in self.lora_active if n != name)
        self._lora_refresh()

    def _forget(self, name: str) -> None:
        for attr in self.param_dicts:
            d = getattr(self, attr)
            if name in d:
                del d[name]
        for d in (self.lora_r, self.lora_alpha, self.lora_scaling, self.lora_dropout, self.lora_variants):
            d.pop(name, None)

    def peft_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters under peft's key suffixes (relative to this module).

        The file format asks the layer, so a layer type with other tensors (Embedding's
        `lora_embedding_A`, DoRA's `lora_magnitude_vector`) only overrides this method.
        """
        out = {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name]}
        return self._with_variant_tensors(name, out)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What save_adapter writes for adapter `name`: `peft_tensors`, as its variants transform them."""
        out = self.peft_tensors(name)
        for v in self.lora_variants.get(name, ()):
            out = v.file_tensors(self, name, out)
        return out

    def _with_variant_tensors(self, name: str, out: dict) -> dict:
        for v in self.lora_variants.get(name, ()):
            out.update(v.extra_tensors(self, name))  # e.g. DoRA's lora_magnitude_vector
        return out

    def set_active(self, names: tuple[str, ...] | list[str]) -> None:
        self.lora_active = tuple(n for n in names if n in self.lora_A)
        self._lora_refresh()

    def _lora_refresh(self) -> None:
        # adapters the forward must add: active and not already merged into the weight
        self._lora_run = tuple(n for n in self.lora_active if n not in self.lora_merged)

    # ---- merge -----------------------------------------------------------------------------------
    def cannot_merge(self) -> str | None:
        """Why this layer's adapters cannot be merged into its weight, or None when they can."""
        return None

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter `name`'s additive update in fp32, laid out like `self.weight` (`scaling * B @ A`,
        as its variants transform it)."""
        delta = self.lora_update(name)
        for v in self.lora_variants.get(name, ()):
            delta = v.delta(self, name, delta)
        return delta

    def lora_update(self, name: str) -> torch.Tensor:
        """`scaling * B @ A` in fp32, laid out like `self.weight` (per layer type)."""
        A, B = self.lora_A[name], self.lora_B[name]
        delta = (B.detach().float() @ A.detach().float()) * self.lora_scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        todo = [n for n in names if n in self.lora_A and n not in self.lora_merged]
        owner = self._merge_variant(todo)
        if owner is not None:
            return bool(torch.isfinite(owner.merged_weight(self, todo)[0]).all())
        new = self.weight.detach().float()
        for n in todo:
            new = new + self.delta_weight(n).to(new.device)
        return bool(torch.isfinite(new).all())

    @torch.no_grad()
    def merge_lora(self, names: list[str], safe_merge: bool = False) -> list[str]:
        """Add the named adapters into `weight`; returns those merged (already merged ones are skipped)."""
        todo = [n for n in names if n in self.lora_A and n not in self.lora_merged]
        if not todo:
            return []
        w = self.weight
        done = None
        owner = self._merge_variant(todo)
        if owner is not None:  # e.g. DoRA rescales rows: f * (W + s B A)
            new, done = owner.merged_weight(self, todo)
        else:
            new = w.detach().float()
            for n in todo:
                new = new + self.delta_weight(n).to(new.device)
        if safe_merge and not torch.isfinite(new).all():
            raise ModelError(f"merging adapters {todo} would put NaN/inf into {self._get_name()}.weight")
        w.copy_(new.to(w.dtype))
        if done is not None:
            done()
        self.lora_merged.extend(todo)
        self._lora_refresh()
        return todo

    @torch.no_grad()
    def unmerge_lora(self, names: list[str] | None = None) -> list[str]:
        """Subtract merged adapters (all of them by default, newest first) from `weight`."""
        todo = [n for n in reversed(self.lora_merged) if names is None or n in names]
        if not todo:
            return []
        w = self.weight
        owner = self._merge_variant(self.lora_merged)
        if owner is not None:  # e.g. merged DoRA adapters do not commute: the variant undoes the stack
            new, todo = owner.unmerged_weight(self, names)
        else:
            new = w.detach().float()
            for n in todo:
                new = new - self.delta_weight(n).to(new.device)
        w.copy_(new.to(w.dtype))
        self.lora_merged = [n for n in self.lora_merged if n not in todo]
        self._lora_refresh()
        return todo

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        if self._lora_route is not None and not self.lora_disabled:
            return self._lora_route.add_lora(self, x, out)
        if self.lora_disabled or not self._lora_run:
            return out
        return self.add_adapters(x, out, self._lora_run)

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` (the base output for input `x`) plus the deltas of plain LoRA adapters `names`."""
        if torch.is_autocast_enabled(x.device.type):
            return self._add_lora_autocast(x, out, names)
        out_shape = out.shape
        acc = out.reshape(-1, out_shape[-1])
        # peft adds in the adapter dtype (fp32), then casts back to the base output dtype
        adapter_dtype = self.lora_A[names[0]].dtype
        # write into the base output in place only without autograd (inference, generation): with
        # autograd, an in-place add on a view costs a CopySlices node and buys nothing
        owned = self.inplace_add and not torch.is_grad_enabled()
        if acc.dtype != adapter_dtype:
            acc, owned = acc.to(adapter_dtype), True
        x2 = x.reshape(-1, x.shape[-1])
        for name in names:
            A, B = self.lora_A[name], self.lora_B[name]
            h = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
            p = self.lora_dropout[name]
            if p > 0.0:
                h = F.dropout(h, p=p, training=self.training)
            t = h @ A.t()
            s = self.lora_scaling[name]
            if B.dtype != acc.dtype:  # adapters cast to different dtypes by the user
                acc = acc + ((t @ B.t()) * s).to(acc.dtype)
            elif owned:
                acc = acc.addmm_(t, B.t(), alpha=s)
            else:
                acc = torch.addmm(acc, t, B.t(), alpha=s)
            owned = True
        if acc.dtype != out.dtype:
            acc = acc.to(out.dtype)
        return acc.view(out_shape)

    def _add_lora_autocast(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """Under autocast (bf16/fp16 mixed precision) the matmuls run in the autocast dtype, as
        peft's nn.Linear-based adapters do; fused in-place ops are not autocast-aware."""
        for name in names:
            h = x
            p = self.lora_dropout[name]
            if p > 0.0:
                h = F.dropout(h, p=p, training=self.training)
            delta = (h @ self.lora_A[name].t()) @ self.lora_B[name].t()
            out = out + (delta * self.lora_scaling[name]).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        base = super().extra_repr()
        parts = [
            f"{n}: r={self.lora_r[n]}, scaling={self.lora_scaling[n]:g}"
            + "".join(f", {v.describe}" for v in self.lora_variants.get(n, ()) if v.describe)
            for n in self.lora_A
        ]
        state = []
        if self.lora_merged:
            state.append(f"merged={self.lora_merged}")
        if self.lora_disabled:
            state.append("disabled")
        return f"{base}, lora=[{'; '.join(parts)}]" + (f", {', '.join(state)}" if state else "")


def init_lora(A: torch.Tensor, B: torch.Tensor, r: int, init: bool | str) -> None:
    """peft's initialisations (A: (r, in), B: (out, r))."""
    with torch.no_grad():
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / r)
            nn.init.zeros_(B)
        elif init is False:
            # peft leaves both nn.Linear default inits: kaiming_uniform(a=sqrt(5)) for A and B
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            raise ConfigError(f"init_lora_weights={init!r} is not supported yet")


class LoraLinear(LoraLayer, nn.Linear):
    """`nn.Linear` with LoRA adapters (F.linear's output is fresh, so it may be added to in place)."""

    inplace_add = True
    supports_dora = True  # DoRA (lora_variants.py) has this layer type's maths


if Conv1D is not None:

    class LoraConv1D(LoraLayer, Conv1D):
        """transformers' `Conv1D` (GPT-2): weight stored as (in, out), hence fan_in_fan_out."""

        fan_in_fan_out = True
        inplace_add = True
        supports_dora = True

else:  # pragma: no cover - transformers is a hard dependency of tuneforge, but not of this file
    LoraConv1D = None  # type: ignore[assignment,misc]
