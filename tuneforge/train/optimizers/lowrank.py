"""GaLore (galore-torch) and APOLLO (apollo-torch), grouped as LLaMA-Factory groups them: the
2-D weights of the target linear layers in one group carrying the low-rank settings (rank,
update_proj_gap, scale, proj_type, ...), the other trainable parameters in the usual weight-decay
groups, one optimizer over all of them.

Layer-wise (galore_layerwise / apollo_layerwise, as LLaMA-Factory): one optimizer per weight,
stepped by a hook as soon as the backward pass has that weight's gradient, which it then frees.
The loop sees them as one `Combined` optimizer whose step does nothing: the schedule reaches each
one's learning rate and checkpoints hold all their states. keys.py allows it with
gradient_accumulation_steps: 1, no fp16 and no max_grad_norm set (the gradients are gone before
the loop would clip them; LLaMA-Factory shows a zero gradient norm then); it runs in one process.

Both packages keep a projector object per weight in the optimizer state. tuneforge's checkpoints
are read with `torch.load(weights_only=True)`, which refuses objects, so the optimizer classes
here are the packages' own with a state_dict that writes each projector as a plain dict (its
class name and attributes: tensors, numbers, text) and a load_state_dict that rebuilds it, only
from the packages' projector modules: a resumed run continues with the same projection."""

from __future__ import annotations

import importlib
import logging

import torch

from ...errors import ConfigError
from .combined import Combined
from .keys import STATE_LAYOUT

log = logging.getLogger("tuneforge")

# the modules a saved projector may come from (nothing else is imported from a checkpoint)
_PROJECTOR_MODULES = ("galore_torch.galore_projector", "apollo_torch.svd_projector",
                      "apollo_torch.random_projector")


def _saved(projector) -> dict:
    cls = type(projector)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", **vars(projector)}


def _rebuilt(saved: dict, device):
    module, _, name = str(saved.get("class", "")).partition(":")
    if module not in _PROJECTOR_MODULES:
        raise ValueError(f"a projector of class {saved.get('class')!r}, not one of galore-torch / apollo-torch")
    projector = object.__new__(getattr(importlib.import_module(module), name))
    for key, value in saved.items():
        if key != "class":
            setattr(projector, key, value.to(device) if isinstance(value, torch.Tensor) else value)
    return projector


class _SavesProjectors:
    """Mixin for an optimizer whose state holds `projector` objects (see the module's doc)."""

    # tuneforge's resume check: the moments of low-rank groups are shaped by the rank
    states_shaped_like_params = False

    def state_dict(self):
        saved = super().state_dict()
        state = {index: {**entry, "projector": _saved(entry["projector"])}
                 if entry.get("projector") is not None and not isinstance(entry["projector"], dict) else entry
                 for index, entry in saved["state"].items()}
        return {**saved, "state": state, STATE_LAYOUT: type(self).__name__}

    def load_state_dict(self, state_dict):
        params = [p for group in self.param_groups for p in group["params"]]
        state = {}
        for index, entry in state_dict["state"].items():
            if isinstance(entry.get("projector"), dict):
                device = params[index].device if isinstance(index, int) and index < len(params) else "cpu"
                entry = {**entry, "projector": _rebuilt(entry["projector"], device)}
            state[index] = entry
        super().load_state_dict({k: v for k, v in state_dict.items() if k != STATE_LAYOUT} | {"state": state})


_CLASSES: dict[type, type] = {}


def _saving(base: type) -> type:
    """`base` (a package's optimizer class) with projector-saving state dicts, made once."""
    if base not in _CLASSES:
        _CLASSES[base] = type(base.__name__, (_SavesProjectors, base), {"__module__": __name__})
    return _CLASSES[base]


def target_weights(model, target: str) -> list[torch.nn.Parameter]:
    """The trainable 2-D weights of the linear layers `target` names ('all': every linear layer
    but the output head; else comma-separated substrings of module names, as LLaMA-Factory)."""
    from ...adapters.targets import output_head_name

    head = output_head_name(model)
    names = [t.strip() for t in target.split(",") if t.strip()]
    weights, matched = [], False
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == head:
            continue
        if names != ["all"] and not any(t in name for t in names):
            continue
        matched = True
        weights.extend(p for p in module.parameters() if p.requires_grad and p.ndim > 1)
    return weights if matched else []


def _groups(model, args, special: list, settings: dict) -> list[dict]:
    ids = {id(p) for p in special}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
              {"params": [p for p in rest if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": special, "weight_decay": args.weight_decay, **settings}]
    return [g for g in groups if g["params"]]


def _special(model, key: str, target: str) -> list:
    weights = target_weights(model, target)
    if not weights:
        raise ConfigError(f"config key '{key}' ({target}) names no trainable linear layer of this model; "
                          "use 'all' or module names such as q_proj,v_proj")
    return weights


def build_galore(model, args, finetune, base_kwargs: dict) -> torch.optim.Optimizer:
    """GaLore over `optim`'s base: adamw_torch -> GaLoreAdamW, the bitsandbytes 8-bit AdamWs ->
    GaLoreAdamW8bit, adafactor -> GaLoreAdafactor (`base_kwargs`: transformers' settings for it)."""
    import galore_torch

    optim = getattr(args, "optim", "adamw_torch") or "adamw_torch"
    if optim == "adafactor":
        base = galore_torch.GaLoreAdafactor
    elif "8bit" in optim:
        base = galore_torch.GaLoreAdamW8bit
    else:
        base = galore_torch.GaLoreAdamW
    settings = {"rank": finetune.galore_rank, "update_proj_gap": finetune.galore_update_interval,
                "scale": finetune.galore_scale, "proj_type": finetune.galore_proj_type}
    special = _special(model, "galore_target", finetune.galore_target)
    kwargs = {k: v for k, v in base_kwargs.items() if k not in ("optim_bits", "is_paged")} \
        if base is not galore_torch.GaLoreAdamW8bit else dict(base_kwargs)
    if base is galore_torch.GaLoreAdamW:
        kwargs["no_deprecation_warning"] = True
    optimizer = _make(_saving(base), _groups(model, args, special, settings), kwargs, finetune.galore_layerwise)
    log.info("GaLore (%s%s) on %d weights: %s", base.__name__, ", layer-wise" * finetune.galore_layerwise,
             len(special), settings)
    return optimizer


def build_apollo(model, args, finetune, base_kwargs: dict) -> torch.optim.Optimizer:
    """APOLLOAdamW, with apollo_scale_front given to the optimizer (which reads it there)."""
    import apollo_torch

    settings = {"rank": finetune.apollo_rank, "proj": finetune.apollo_proj,
                "proj_type": finetune.apollo_proj_type, "update_proj_gap": finetune.apollo_update_interval,
                "scale": finetune.apollo_scale, "scale_type": finetune.apollo_scale_type}
    special = _special(model, "apollo_target", finetune.apollo_target)
    optimizer = _make(_saving(apollo_torch.APOLLOAdamW), _groups(model, args, special, settings),
                      {"scale_front": finetune.apollo_scale_front, **base_kwargs}, finetune.apollo_layerwise)
    log.info("APOLLO%s on %d weights: %s", " (layer-wise)" * finetune.apollo_layerwise, len(special), settings)
    return optimizer


def _make(cls: type, groups: list[dict], kwargs: dict, layerwise: bool) -> torch.optim.Optimizer:
    """`cls(groups, **kwargs)`, or with `layerwise` one `cls` per weight stepped in the backward."""
    if not layerwise:
        return cls(groups, **kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ConfigError("layer-wise GaLore / APOLLO steps each weight before the processes average its "
                          "gradient; launch one process or set galore_layerwise / apollo_layerwise: false")
    parts = {}
    for group in groups:
        for param in group["params"]:
            parts[param] = cls([{**group, "params": [param]}], **kwargs)

    def step_now(param):
        if param.grad is not None:
            parts[param].step()
            parts[param].zero_grad(set_to_none=True)

    for param in parts:
        param.register_post_accumulate_grad_hook(step_now)
    log.warning("layer-wise update: each weight steps inside the backward pass; max_grad_norm clipping "
                "does not apply (the gradient norm is logged as 0)")
    return Combined(list(parts.values()), stepped_in_backward=True)
