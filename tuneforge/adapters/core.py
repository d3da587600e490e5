"""Adapter life cycle on any `nn.Module`: inject, activate, disable, merge, delete, unload.

Per-model bookkeeping (configs, active names, trainability, trained biases) lives in one plain
attribute, `model._tuneforge_adapters`; per-layer state lives on the adapted layers themselves.
Which layers carry an adapter is always read from the modules, never cached by name.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError

from .layer import AdapterLayer, rebind_hooked_forward
from .methods import AdapterMethod, method_named, method_of_config
from .modules_to_save import ModulesToSave, make_modules_to_save
from .registry import adapter_class_for, supported_base_types
from .targets import candidate_modules, resolve_targets

STATE_ATTR = "_tuneforge_adapters"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class AdapterState:
    configs: dict[str, Any] = field(default_factory=dict)  # adapter name -> its method's config
    active: list[str] = field(default_factory=list)
    trainable: dict[str, bool] = field(default_factory=dict)
    biases: dict[str, list[str]] = field(default_factory=dict)  # base bias parameters each adapter trains


def get_state(model: nn.Module) -> AdapterState | None:
    return model.__dict__.get(STATE_ATTR)


def require_state(model: nn.Module, name: str | None = None) -> AdapterState:
    st = get_state(model)
    if st is None or not st.configs:
        raise ConfigError(f"{type(model).__name__} has no adapters; call add_adapter or load_adapter first")
    if name is not None and name not in st.configs:
        raise ConfigError(f"no adapter named {name!r}; this model has {sorted(st.configs)}")
    return st


def adapter_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """(module name, layer) for every adapted layer (any method), or only those carrying adapter `name`."""
    for path, m in model.named_modules():
        if isinstance(m, AdapterLayer) and (name is None or name in m.adapter_names()):
            yield path, m


def lora_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """(module name, layer) for every LoRA layer, or only those carrying adapter `name`."""
    cls = method_named("lora").layer_class
    for path, m in adapter_layers(model, name):
        if isinstance(m, cls):
            yield path, m


def method_of(model: nn.Module, name: str) -> AdapterMethod:
    """The method of adapter `name` (ConfigError when the model has no such adapter)."""
    return method_of_config(require_state(model, name).configs[name])


def saved_modules(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, ModulesToSave]]:
    for path, m in model.named_modules():
        if isinstance(m, ModulesToSave) and (name is None or name in m.modules_to_save):
            yield path, m


def list_adapters(model: nn.Module) -> dict[str, Any]:
    st = get_state(model)
    return dict(st.configs) if st else {}


def active_adapters(model: nn.Module) -> list[str]:
    st = get_state(model)
    return list(st.active) if st else []


# ---- add ---------------------------------------------------------------------------------------
def add_adapter(model: nn.Module, cfg: Any, name: str = "default") -> nn.Module:
    """Inject adapter `name` in place, freeze the base, make `name` the active, trainable adapter.

    `cfg` is a registered method's config (LoraConfig, IA3Config, ...); its method does the work.
    Raises ConfigError, before any module changes, for a config of no registered method, targets
    the method cannot adapt, and (LoRA) a rank whose A and B matrices cannot fit in memory (a rank
    above a layer's min(in, out) only warns).
    """
    method = method_of_config(cfg)
    _check_name(name)
    st = get_state(model)
    if st is not None and name in st.configs:
        raise ConfigError(
            f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or choose another name"
        )
    merged = sorted({n for _, m in adapter_layers(model) for n in m.merged_adapters()})
    if merged:
        raise ConfigError(f"adapters {merged} are merged into the weights; call unmerge_adapters(model) first")
    cfg = copy.deepcopy(cfg)  # the model's record must not change when the caller edits theirs
    if method.inject is not None and not method.layers:  # a method with both (MAM) also adapts layers
        targets, to_save = [], _plan_modules_to_save(model, cfg, set(), method)
    else:
        targets = _plan_targets(model, cfg, method)
        to_save = _plan_modules_to_save(model, cfg, {p for p, _ in targets}, method)
        if method.check_targets is not None:
            method.check_targets(targets, cfg)

    _warn_shared_weights(model, [p for p, _ in targets])
    if st is None:
        st = AdapterState()
        model.__dict__[STATE_ATTR] = st
    if method.inject is not None:
        try:
            method.inject(model, cfg, name)
        except Exception:
            if not st.configs:  # a refused first adapter leaves no (empty) adapter state behind
                del model.__dict__[STATE_ATTR]
            raise
    shared = {} if method.shared is None else {"shared": method.shared(model, cfg, name, targets)}
    warned = False
    for path, module in targets:
        if not isinstance(module, AdapterLayer):
            base = type(module)
            module.__class__ = adapter_class_for(module, method.name)
            module.setup(base)
            rebind_hooked_forward(module)
        # layer types with a fixed layout (Embedding, Conv2d) say None: the config's value does not apply
        own = getattr(module, "fan_in_fan_out", None)
        wanted = getattr(cfg, "fan_in_fan_out", own)
        if own is not None and wanted != own and not warned:
            warnings.warn(
                f"fan_in_fan_out={wanted} but {path} is a {module.base_class.__name__}; "
                f"using fan_in_fan_out={own} for it (as peft does)",
                stacklevel=2,
            )
            warned = True
        module.add_from_config(name, cfg, path, **shared)
    for path, module in to_save:
        make_modules_to_save(module, path, model).add_copy(name)

    st.configs[name] = cfg
    st.trainable[name] = True
    st.biases[name] = _bias_params(model, cfg, [p for p, _ in targets])
    for p in model.parameters():
        p.requires_grad_(False)
    _activate(model, st, [name])
    return model


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"adapter name must be letters, digits, '_' or '-', got {name!r}")
    if hasattr(nn.ParameterDict, name) or hasattr(nn.ModuleDict, name):
        raise ConfigError(f"adapter name {name!r} clashes with a torch attribute; choose another name")


def _plan_targets(model: nn.Module, cfg: Any, method: AdapterMethod) -> list[tuple[str, nn.Module]]:
    if method.resolve_targets is not None:
        found = method.resolve_targets(model, cfg)
    else:
        found = resolve_targets(model, cfg)
    supported = ", ".join(t.__name__ for t in supported_base_types(method.name))
    label = method.label or method.name
    for path, module in found:
        if isinstance(module, ModulesToSave):
            raise ConfigError(f"{path} is in modules_to_save of another adapter; it cannot also get {label}")
        if isinstance(module, AdapterLayer) and not isinstance(module, method.layer_class):
            raise ConfigError(
                f"{path} already carries a {module.method_name} adapter; one layer takes adapters of one "
                f"method only: leave {path} out of target_modules, delete the other adapter, or load the two "
                "in separate models (e.g. two `tuneforge api` processes)"
            )
        if not isinstance(module, AdapterLayer) and adapter_class_for(module, method.name) is None:
            raise ConfigError(
                f"target {path} is a {type(module).__name__}, which {label} does not support yet "
                f"(supported: {supported}); narrow target_modules so it matches only those layers"
            )
        layer_cls = type(module) if isinstance(module, AdapterLayer) else adapter_class_for(module, method.name)
        layer_cls.check_config(module, path, cfg)  # before any module is touched
    for path, _ in found:
        for owner, _m in saved_modules(model):
            if path.startswith(owner + "."):
                raise ConfigError(f"{path} lies inside {owner}, a modules_to_save module of another adapter")
    return found


def _plan_modules_to_save(
    model: nn.Module, cfg: Any, targets: set[str], method: AdapterMethod
) -> list[tuple[str, nn.Module]]:
    if not getattr(cfg, "modules_to_save", None):
        return []
    # peft's rule: a module is saved when its name ends with one of the entries
    found = [(n, m) for n, m in candidate_modules(model) if any(n.endswith(k) for k in cfg.modules_to_save)]
    # keep outermost matches only
    found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    if not found:
        raise ConfigError(
            f"modules_to_save={cfg.modules_to_save!r} matched no module of {type(model).__name__}"
        )
    for path, module in found:
        clash = [t for t in targets if t == path or t.startswith(path + ".")]
        if clash:
            raise ConfigError(
                f"{clash[0]} is both a {method.label or method.name} target and (inside) modules_to_save module {path}"
            )
        inner = [(f"{path}.{n}" if n else path, m) for n, m in module.named_modules() if isinstance(m, AdapterLayer)]
        if inner:
            what = method_named(inner[0][1].method_name)
            raise ConfigError(
                f"modules_to_save module {path} contains {what.label or what.name} layers ({inner[0][0]}); "
                "pick one or the other"
            )
    return found


def _bias_params(model: nn.Module, cfg: Any, target_paths: list[str]) -> list[str]:
    bias = getattr(cfg, "bias", "none")  # methods without a bias option train none
    if bias == "none":
        return []
    params = dict(model.named_parameters())
    if bias.endswith("_only"):  # the biases of the adapted layers ('lora_only', 'vera_only')
        return [f"{p}.bias" for p in target_paths if f"{p}.bias" in params]
    skip = [f"{p}." for p, _ in saved_modules(model)]
    return [
        n
        for n in params
        if (n == "bias" or n.endswith(".bias")) and not any(n.startswith(s) for s in skip)
    ]


def _warn_shared_weights(model: nn.Module, paths: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    for path in paths:
        weight = getattr(model.get_submodule(path), "weight", None)  # None: a block (bottleneck's mlp)
        if weight is None:
            continue
        others = [n for n in owners.get(id(weight), []) if n != path]
        if others:
            warnings.warn(
                f"{path}.weight is shared with {others[0]} (tied weights); merge_adapters / unload(merge=True) "
                f"will change {others[0]} too",
                stacklevel=3,
            )


# ---- activation and trainability --------------------------------------------------------------
def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Activate one or several adapters (their outputs are summed); the others stay loaded but off."""
    st = require_state(model)
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; this model has {sorted(st.configs)}")
    merged = sorted({n for _, m in adapter_layers(model) for n in m.merged_adapters()} - set(names))
    if merged:
        raise ConfigError(
            f"adapters {merged} are merged into the weights; call unmerge_adapters(model) before deactivating them"
        )
    for path, m in saved_modules(model):
        owners = [n for n in names if n in m.modules_to_save]
        if len(owners) > 1:
            raise ConfigError(f"adapters {owners} each have their own copy of {path} (modules_to_save); activate one")
    _activate(model, st, names)


def _activate(model: nn.Module, st: AdapterState, names: list[str]) -> None:
    st.active = list(names)
    for _, m in adapter_layers(model):
        m.set_active(names)
    for _, m in saved_modules(model):
        m.set_active(names)
    refresh_trainable(model)


def refresh_trainable(model: nn.Module) -> None:
    """requires_grad = adapter is active and trainable, for adapter params and the biases they train."""
    st = require_state(model)
    on = {n for n in st.active if st.trainable.get(n)}
    for _, m in adapter_layers(model):
        for n in m.adapter_names():
            for p in m.adapter_parameters(n).values():
                p.requires_grad_(n in on)
    for _, m in saved_modules(model):
        for n, twin in m.modules_to_save.items():
            twin.requires_grad_(n in on)
    claimed = {p for n in on for p in st.biases.get(n, [])}
    params = dict(model.named_parameters())
    for n in st.biases:
        for pn in st.biases[n]:
            if pn in params:
                params[pn].requires_grad_(pn in claimed)


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    st = require_state(model, name)
    st.trainable[name] = bool(trainable)
    refresh_trainable(model)


# ---- delete / disable --------------------------------------------------------------------------
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (unmerging it first); layers left without adapters become plain again."""
    st = require_state(model, name)
    params = dict(model.named_parameters())
    for pn in st.biases.get(name, []):
        if pn in params:
            params[pn].requires_grad_(False)
    for _, m in list(adapter_layers(model, name)):
        m.delete_adapter(name)
        if not m.adapter_names():
            m.strip()
            rebind_hooked_forward(m)
    method = method_of_config(st.configs[name])
    if method.remove is not None:
        method.remove(model, name)
    for _, m in list(saved_modules(model, name)):
        m.delete_copy(name)
        if not m.modules_to_save:
            m.strip()
            rebind_hooked_forward(m)
    for d in (st.configs, st.trainable, st.biases):
        d.pop(name, None)
    if not st.configs:
        del model.__dict__[STATE_ATTR]
        return
    _activate(model, st, [n for n in st.active if n != name])


@contextmanager
def disable_adapters(model: nn.Module):
    """`with disable_adapters(model):` runs the base model (merged adapters are unmerged meanwhile)."""
    layers = [m for _, m in adapter_layers(model)]
    saved = [m for _, m in saved_modules(model)]
    prev = [(m, m.adapters_disabled) for m in layers] + [(m, m.mts_disabled) for m in saved]
    remerge = []
    try:
        for m in layers:
            undone = m.unmerge()
            if undone:
                remerge.append((m, list(reversed(undone))))
            m.adapters_disabled = True
        for m in saved:
            m.mts_disabled = True
        yield model
    finally:
        for m, flag in prev:
            if isinstance(m, AdapterLayer):
                m.adapters_disabled = flag
            else:
                m.mts_disabled = flag
        for m, names in remerge:
            m.merge(names)


# ---- merge / unload ----------------------------------------------------------------------------
def merge_adapters(model: nn.Module, names: list[str] | None = None, safe_merge: bool = False) -> list[str]:
    """Add the active adapters (or `names`, a subset of them) into the base weights, in place.

    Already merged adapters are skipped, so merging twice is a no-op. With `safe_merge`, every
    merged weight is checked for NaN/inf before any weight is written. Returns the names merged.
    """
    st = require_state(model)
    names = list(st.active) if names is None else ([names] if isinstance(names, str) else list(names))
    inactive = [n for n in names if n not in st.active]
    if inactive:
        raise ConfigError(f"only active adapters can be merged; {inactive} are not active (active: {st.active})")
    layers = [m for _, m in adapter_layers(model)]
    if any(m.adapters_disabled for m in layers):
        raise ConfigError("cannot merge inside disable_adapters(); leave the with-block first")
    _refuse_unmergeable(model, names)
    if safe_merge:
        for path, m in adapter_layers(model):
            if not m.merge_is_finite(names):
                raise ModelError(f"merging {names} would put NaN/inf into {path}.weight; nothing was merged")
    done: set[str] = set()
    for m in layers:
        done.update(m.merge(names, safe_merge=safe_merge))
    if not done and names:
        warnings.warn(f"adapters {names} are already merged; nothing to do", stacklevel=2)
    return sorted(done)


def _refuse_unmergeable(model: nn.Module, names: list[str]) -> None:
    # checked for every layer first, so a refused merge leaves no layer half merged
    for path, m in adapter_layers(model):
        why = m.cannot_merge()
        if why and any(n in m.adapter_names() and n not in m.merged_adapters() for n in names):
            raise ConfigError(f"cannot merge into {path}: {why}; nothing was merged")


def unmerge_adapters(model: nn.Module) -> list[str]:
    """Subtract every merged adapter from the base weights again; returns the names unmerged."""
    done: set[str] = set()
    for _, m in adapter_layers(model):
        done.update(m.unmerge())
    return sorted(done)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter layer and return the plain model (same object, base parameter names).

    merge=True folds the active adapters (and the active adapter's modules_to_save copies) into
    the base weights; merge=False restores the base weights (also those PiSSA / OLoRA changed). Biases trained with `bias='all'` or
    'lora_only' were trained in place and stay. Base parameters stay frozen.
    """
    st = get_state(model)
    if st is None:
        return model
    if merge:
        _refuse_unmergeable(model, list(st.active))
        for _, m in adapter_layers(model):
            m.merge(list(st.active))
        for _, m in saved_modules(model):
            if m.mts_active is not None:
                m.write_back(m.mts_active)
    else:
        unmerge_adapters(model)
    kept = set(st.active) if merge else set()
    for _, m in adapter_layers(model):
        # e.g. PiSSA / OLoRA took their start out of the weight: adapters not folded in give it back
        for n in m.adapter_names():
            if n not in kept:
                m.release_adapter(n)
    for _, m in list(adapter_layers(model)):
        m.strip()
        rebind_hooked_forward(m)
    for n, c in list(st.configs.items()):
        method = method_of_config(c)
        if method.remove is not None:
            method.remove(model, n)
    for _, m in list(saved_modules(model)):
        m.strip()
        rebind_hooked_forward(m)
    del model.__dict__[STATE_ATTR]
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameter values, number of all parameter values)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


@torch.no_grad()
def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors in our naming (`<module>.lora_A.<name>`, `<module>.ia3_l.<name>`, ...),
    for tests and tools."""
    out = {}
    for path, m in adapter_layers(model, name):
        for attr, p in m.adapter_parameters(name).items():
            out[f"{path}.{attr}.{name}"] = p
    return out
