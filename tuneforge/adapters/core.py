"""Adapter life cycle on any `nn.Module`: inject, activate, disable, merge, delete, unload.

Per-model bookkeeping (configs, active names, trainability, trained biases) lives in one plain
attribute, `model._tuneforge_adapters`; per-layer state lives on the adapted layers themselves.
Which layers carry an adapter is always read from the modules, never cached by name.
"""

from __future__ import annotations

import copy
import re
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError

from .config import LoraConfig
from .inits import restore_base
from .lora import LoraLayer
from .modules_to_save import ModulesToSave, make_modules_to_save
from .registry import adapter_class_for, supported_base_types
from .sizes import check_adapter_size
from .targets import candidate_modules, pattern_value, resolve_targets

STATE_ATTR = "_tuneforge_adapters"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class AdapterState:
    configs: dict[str, LoraConfig] = field(default_factory=dict)
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


def lora_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, LoraLayer]]:
    """(module name, layer) for every LoRA layer, or only those carrying adapter `name`."""
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer) and (name is None or name in m.lora_A):
            yield path, m


def saved_modules(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, ModulesToSave]]:
    for path, m in model.named_modules():
        if isinstance(m, ModulesToSave) and (name is None or name in m.modules_to_save):
            yield path, m


def list_adapters(model: nn.Module) -> dict[str, LoraConfig]:
    st = get_state(model)
    return dict(st.configs) if st else {}


def active_adapters(model: nn.Module) -> list[str]:
    st = get_state(model)
    return list(st.active) if st else []


# ---- add ---------------------------------------------------------------------------------------
def add_adapter(model: nn.Module, cfg: LoraConfig, name: str = "default") -> nn.Module:
    """Inject adapter `name` in place, freeze the base, make `name` the active, trainable adapter.

    Raises ConfigError, before any module changes, for targets LoRA cannot adapt and for a rank
    whose A and B matrices cannot fit in memory (a rank above a layer's min(in, out) only warns).
    """
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"add_adapter expects a LoraConfig, got {type(cfg).__name__}")
    _check_name(name)
    st = get_state(model)
    if st is not None and name in st.configs:
        raise ConfigError(
            f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or choose another name"
        )
    merged = sorted({n for _, m in lora_layers(model) for n in m.lora_merged})
    if merged:
        raise ConfigError(f"adapters {merged} are merged into the weights; call unmerge_adapters(model) first")
    cfg = copy.deepcopy(cfg)  # the model's record must not change when the caller edits theirs
    targets = _plan_targets(model, cfg)
    to_save = _plan_modules_to_save(model, cfg, {p for p, _ in targets})
    check_adapter_size(targets, {p: pattern_value(cfg.rank_pattern, p, cfg.r) for p, _ in targets})

    _warn_shared_weights(model, [p for p, _ in targets])
    if st is None:
        st = AdapterState()
        model.__dict__[STATE_ATTR] = st
    warned = False
    for path, module in targets:
        if not isinstance(module, LoraLayer):
            base = type(module)
            module.__class__ = adapter_class_for(module)
            module.lora_setup(base)
            _rebind_hooked_forward(module)
        # layer types with a fixed layout (Embedding, Conv2d) say None: the config's value does not apply
        if module.fan_in_fan_out is not None and cfg.fan_in_fan_out != module.fan_in_fan_out and not warned:
            warnings.warn(
                f"fan_in_fan_out={cfg.fan_in_fan_out} but {path} is a {module._lora_base_class.__name__}; "
                f"using fan_in_fan_out={module.fan_in_fan_out} for it (as peft does)",
                stacklevel=2,
            )
            warned = True
        r = pattern_value(cfg.rank_pattern, path, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, path, cfg.lora_alpha)
        module.add_lora(name, r, alpha, cfg.lora_dropout, cfg.use_rslora, cfg.init_lora_weights, cfg.use_dora)
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


def _plan_targets(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module]]:
    found = resolve_targets(model, cfg)
    supported = ", ".join(t.__name__ for t in supported_base_types())
    for path, module in found:
        if isinstance(module, ModulesToSave):
            raise ConfigError(f"{path} is in modules_to_save of another adapter; it cannot also get LoRA")
        if not isinstance(module, LoraLayer) and adapter_class_for(module) is None:
            raise ConfigError(
                f"target {path} is a {type(module).__name__}, which LoRA does not support yet "
                f"(supported: {supported}); narrow target_modules so it matches only those layers"
            )
        layer_cls = type(module) if isinstance(module, LoraLayer) else adapter_class_for(module)
        layer_cls.check_target(module, path, pattern_value(cfg.rank_pattern, path, cfg.r))
        if cfg.use_dora:  # checked before any module is touched
            layer_cls.check_dora(module, path)
    for path, _ in found:
        for owner, _m in saved_modules(model):
            if path.startswith(owner + "."):
                raise ConfigError(f"{path} lies inside {owner}, a modules_to_save module of another adapter")
    return found


def _plan_modules_to_save(model: nn.Module, cfg: LoraConfig, targets: set[str]) -> list[tuple[str, nn.Module]]:
    if not cfg.modules_to_save:
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
            raise ConfigError(f"{clash[0]} is both a LoRA target and (inside) modules_to_save module {path}")
        inner = [f"{path}.{n}" if n else path for n, m in module.named_modules() if isinstance(m, LoraLayer)]
        if inner:
            raise ConfigError(f"modules_to_save module {path} contains LoRA layers ({inner[0]}); pick one or the other")
    return found


def _bias_params(model: nn.Module, cfg: LoraConfig, target_paths: list[str]) -> list[str]:
    if cfg.bias == "none":
        return []
    params = dict(model.named_parameters())
    if cfg.bias == "lora_only":
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
        weight = model.get_submodule(path).weight
        others = [n for n in owners.get(id(weight), []) if n != path]
        if others:
            warnings.warn(
                f"{path}.weight is shared with {others[0]} (tied weights); merge_adapters / unload(merge=True) "
                f"will change {others[0]} too",
                stacklevel=3,
            )


def _rebind_hooked_forward(module: nn.Module) -> None:
    # accelerate's hooks keep the original bound forward in `_old_forward`; point it at the new class
    if "_old_forward" in module.__dict__:
        module._old_forward = types.MethodType(type(module).forward, module)


# ---- activation and trainability --------------------------------------------------------------
def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Activate one or several adapters (their outputs are summed); the others stay loaded but off."""
    st = require_state(model)
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; this model has {sorted(st.configs)}")
    merged = sorted({n for _, m in lora_layers(model) for n in m.lora_merged} - set(names))
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
    for _, m in lora_layers(model):
        m.set_active(names)
    for _, m in saved_modules(model):
        m.set_active(names)
    refresh_trainable(model)


def refresh_trainable(model: nn.Module) -> None:
    """requires_grad = adapter is active and trainable, for adapter params and the biases they train."""
    st = require_state(model)
    on = {n for n in st.active if st.trainable.get(n)}
    for _, m in lora_layers(model):
        for n in m.lora_A.keys():
            m.lora_A[n].requires_grad_(n in on)
            m.lora_B[n].requires_grad_(n in on)
        for n, mag in m.lora_magnitude_vector.items():
            mag.requires_grad_(n in on)
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
    for _, m in list(lora_layers(model, name)):
        m.delete_lora(name)
        if not m.lora_A:
            m.strip()
            _rebind_hooked_forward(m)
    for _, m in list(saved_modules(model, name)):
        m.delete_copy(name)
        if not m.modules_to_save:
            m.strip()
            _rebind_hooked_forward(m)
    for d in (st.configs, st.trainable, st.biases):
        d.pop(name, None)
    if not st.configs:
        del model.__dict__[STATE_ATTR]
        return
    _activate(model, st, [n for n in st.active if n != name])


@contextmanager
def disable_adapters(model: nn.Module):
    """`with disable_adapters(model):` runs the base model (merged adapters are unmerged meanwhile)."""
    layers = [m for _, m in lora_layers(model)]
    saved = [m for _, m in saved_modules(model)]
    prev = [(m, m.lora_disabled) for m in layers] + [(m, m.mts_disabled) for m in saved]
    remerge = []
    try:
        for m in layers:
            undone = m.unmerge_lora()
            if undone:
                remerge.append((m, list(reversed(undone))))
            m.lora_disabled = True
        for m in saved:
            m.mts_disabled = True
        yield model
    finally:
        for m, flag in prev:
            if isinstance(m, LoraLayer):
                m.lora_disabled = flag
            else:
                m.mts_disabled = flag
        for m, names in remerge:
            m.merge_lora(names)


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
    layers = [m for _, m in lora_layers(model)]
    if any(m.lora_disabled for m in layers):
        raise ConfigError("cannot merge inside disable_adapters(); leave the with-block first")
    _refuse_unmergeable(model, names)
    if safe_merge:
        for path, m in lora_layers(model):
            if not m.merge_is_finite(names):
                raise ModelError(f"merging {names} would put NaN/inf into {path}.weight; nothing was merged")
    done: set[str] = set()
    for m in layers:
        done.update(m.merge_lora(names, safe_merge=safe_merge))
    if not done and names:
        warnings.warn(f"adapters {names} are already merged; nothing to do", stacklevel=2)
    return sorted(done)


def _refuse_unmergeable(model: nn.Module, names: list[str]) -> None:
    # checked for every layer first, so a refused merge leaves no layer half merged
    for path, m in lora_layers(model):
        why = m.cannot_merge()
        if why and any(n in m.lora_A and n not in m.lora_merged for n in names):
            raise ConfigError(f"cannot merge into {path}: {why}; nothing was merged")


def unmerge_adapters(model: nn.Module) -> list[str]:
    """Subtract every merged adapter from the base weights again; returns the names unmerged."""
    done: set[str] = set()
    for _, m in lora_layers(model):
        done.update(m.unmerge_lora())
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
        for _, m in lora_layers(model):
            m.merge_lora(list(st.active))
        for _, m in saved_modules(model):
            if m.mts_active is not None:
                m.write_back(m.mts_active)
    else:
        unmerge_adapters(model)
    kept = set(st.active) if merge else set()
    for _, m in lora_layers(model):
        # PiSSA / OLoRA took their start out of the weight: adapters not folded in give it back
        for n in list(m.__dict__.get("lora_initial", {})):
            if n not in kept:
                restore_base(m, n)
    for _, m in list(lora_layers(model)):
        m.strip()
        _rebind_hooked_forward(m)
    for _, m in list(saved_modules(model)):
        m.strip()
        _rebind_hooked_forward(m)
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
    """Adapter `name`'s tensors in our naming (`<module>.lora_A.<name>`, ...), for tests and tools."""
    out = {}
    for path, m in lora_layers(model, name):
        out[f"{path}.lora_A.{name}"] = m.lora_A[name]
        out[f"{path}.lora_B.{name}"] = m.lora_B[name]
        if name in m.lora_magnitude_vector:
            out[f"{path}.lora_magnitude_vector.{name}"] = m.lora_magnitude_vector[name]
    return out
