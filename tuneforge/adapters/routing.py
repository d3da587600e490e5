"""`route_adapters`: a different adapter for each sample of one batch (peft's `adapter_names=`).

    with route_adapters(model, ["a", "__base__", "b"]):
        out = model(input_ids)                       # row 0 runs adapter a, row 1 the base model, row 2 b
        seqs = model.generate(input_ids, num_beams=4)

Any loaded adapter may be named, active or not (as with peft); "__base__" runs no adapter.
Each adapted layer groups the rows of its input by adapter and applies that adapter to those
rows only, through the layer's own `add_adapters(x, out, names)` (the adapter-layer protocol,
layer.py) on the sub-batch, so every method, layer type and variant (LoRA on Linear, Conv1D,
Embedding, Conv2d, DoRA; IA3) routes the same way. A
modules_to_save module runs each adapter's copy on its rows (the original for "__base__" and for
adapters without a copy). Rows are the first dimension of each layer's input; when it is a multiple
k of len(names) (generate's num_beams / num_return_sequences expansion, which repeats each
sample k times in a row), each name covers k consecutive rows.

Refused with a ConfigError: an empty or unknown name, the model in training mode (dropout and
training belong to one adapter set per batch, as in peft), adapters merged into the weights (the
merged deltas would reach every row), use inside `disable_adapters`, and nesting. Gradients
through a routed forward in eval mode are exact, so autograd stays allowed. The layers' routing
state is removed on exit, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .core import adapter_layers, require_state, saved_modules
from .layer import AdapterLayer

BASE = "__base__"
_ROUTE_ATTR = "_tuneforge_route"


class Route:
    """The per-sample adapter names, shared by every layer of the model while routing is on."""

    def __init__(self, names: tuple[str, ...], paths: dict[int, str]):
        self.names = names
        self._paths = paths  # id(module) -> module name, for error messages
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor | None]]] = {}

    def groups(self, module: nn.Module, batch: int, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """[(name, row indices)] for a batch of `batch` rows; indices None when one name has all rows."""
        key = (batch, device)
        if key not in self._groups:  # the same for every layer of one forward: computed once
            self._groups[key] = self._make_groups(module, batch, device)
        return self._groups[key]

    def _make_groups(self, module, batch, device):
        n = len(self.names)
        if batch % n or batch == 0:
            where = self._paths.get(id(module), type(module).__name__)
            raise ConfigError(
                f"route_adapters got {n} adapter names but {where} received a batch of {batch} rows; pass one "
                f"name per sample (a batch of k * {n} rows, as generate's beam / multi-sequence expansion makes, "
                "gives each name k consecutive rows)"
            )
        k = batch // n
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).extend(range(i * k, (i + 1) * k))
        if len(rows) == 1:
            return [(self.names[0], None)]
        return [(name, torch.tensor(ix, device=device)) for name, ix in rows.items()]

    def _check(self, module: nn.Module) -> None:
        # the state may change inside the with-block; what would make the result wrong is refused here
        where = self._paths.get(id(module), type(module).__name__)
        if module.training:
            raise ConfigError(f"route_adapters needs eval mode, but {where} is training; call model.eval()")
        merged = module.merged_adapters() if isinstance(module, AdapterLayer) else []
        if merged:
            raise ConfigError(
                f"{where} has adapters {merged} merged into its weight while routing; "
                "call unmerge_adapters(model) first"
            )

    # ---- called from the layers' forward -----------------------------------------------------------
    def add_lora(self, layer: AdapterLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """An adapted layer's output with each row's adapter applied (`out` is the base output for `x`)."""
        self._check(layer)
        own = layer.adapter_names()
        todo = [(name, ix) for name, ix in self.groups(layer, x.shape[0], x.device) if name in own]
        if not todo:
            return out
        if todo[0][1] is None:
            return layer.add_adapters(x, out, (todo[0][0],))
        # rows of different groups are disjoint; without autograd the fresh base output can be reused
        inplace = getattr(layer, "inplace_add", False)
        result = out if inplace and not torch.is_grad_enabled() else out.clone()
        for name, ix in todo:
            result[ix] = layer.add_adapters(x[ix], out[ix], (name,))
        return result

    def run_saved(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """A modules_to_save module's output: each row through its adapter's copy or the original."""
        self._check(module)
        if not args or not torch.is_tensor(args[0]):
            where = self._paths.get(id(module), type(module).__name__)
            raise ConfigError(
                f"route_adapters: {where} (modules_to_save) must get its batch as first positional argument"
            )
        x, rest = args[0], args[1:]
        copies = module.modules_to_save
        # adapters without a copy of this module run the original, like "__base__"
        merged: dict[str | None, list[torch.Tensor | None]] = {}
        for name, ix in self.groups(module, x.shape[0], x.device):
            merged.setdefault(name if name in copies else None, []).append(ix)
        if len(merged) == 1:
            (owner,) = merged
            return self._run_one(module, owner, (x, *rest), kwargs)
        result = None
        for owner, parts in merged.items():
            ix = parts[0] if len(parts) == 1 else torch.cat(parts)
            y = self._run_one(module, owner, (x[ix], *rest), kwargs)
            if not torch.is_tensor(y):
                raise ConfigError(
                    f"route_adapters: modules_to_save module {type(module).__name__} must return a tensor"
                )
            if result is None:
                result = y.new_empty((x.shape[0], *y.shape[1:]))
            result[ix] = y
        return result

    @staticmethod
    def _run_one(module, owner: str | None, args: tuple, kwargs: dict) -> Any:
        if owner is None:
            return module._mts_base_class.forward(module, *args, **kwargs)
        return module._run_copy(module.modules_to_save[owner], args, kwargs)


@contextmanager
def route_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """`with route_adapters(model, names):` sample i of each batch runs adapter names[i] (see module doc)."""
    st = require_state(model)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"route_adapters needs a list with one adapter name per sample, got {names!r}")
    names = tuple(names)
    if not names:
        raise ConfigError("route_adapters got an empty list; give one adapter name (or '__base__') per sample")
    unknown = sorted({n for n in names if n != BASE and n not in st.configs})
    if unknown:
        raise ConfigError(
            f"route_adapters: unknown adapter(s) {unknown}; this model has {sorted(st.configs)} and '{BASE}'"
        )
    if _ROUTE_ATTR in model.__dict__:
        raise ConfigError("route_adapters is already active on this model; nesting is not supported")
    if model.training:
        raise ConfigError("route_adapters needs eval mode (per-sample adapters are for inference); call model.eval()")
    layers = list(adapter_layers(model))
    saved = list(saved_modules(model))
    merged = sorted({n for _, m in layers for n in m.merged_adapters()})
    if merged:
        raise ConfigError(f"adapters {merged} are merged into the weights; call unmerge_adapters(model) before routing")
    if any(m.adapters_disabled for _, m in layers) or any(m.mts_disabled for _, m in saved):
        raise ConfigError("route_adapters cannot be used inside disable_adapters(); leave that with-block first")
    route = Route(names, {id(m): p for p, m in layers + saved})
    model.__dict__[_ROUTE_ATTR] = route
    try:
        for _, m in layers:
            setattr(m, m.route_attr, route)
        for _, m in saved:
            m._mts_route = route
        yield model
    finally:
        for _, m in layers:
            m.__dict__.pop(m.route_attr, None)
        for _, m in saved:
            m.__dict__.pop("_mts_route", None)
        model.__dict__.pop(_ROUTE_ATTR, None)
