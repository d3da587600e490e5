"""Which modules an adapter config selects, with peft's matching rules.

- list of keys: a module matches when its name equals a key or ends with '.' + key;
  `layers_to_transform` / `layers_pattern` then narrow the match to some layer indices;
- a string: a regex that must match the whole module name;
- 'all-linear': every Linear / Conv1D except the model's output head;
- `exclude_modules` wins over targets, and modules listed in `modules_to_save` are never targeted.
`rank_pattern` / `alpha_pattern` keys are regexes matched against the end of the module name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import torch

from tuneforge.errors import ConfigError
from tuneforge.quant.linear import QuantLinear

from .config import ALL_LINEAR, LoraConfig

log = logging.getLogger("tuneforge")

# children that adapters add to a module (beside each adapter layer's own `param_dicts`); nothing
# below them is ever a target
ADAPTER_CHILD_NAMES = ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save")


def linear_types() -> tuple[type, ...]:

    types: list[type] = [torch.nn.Linear, QuantLinear]
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # adapters work on any nn.Module; transformers is optional here
        pass
    else:
        types.append(Conv1D)
    return tuple(types)


def candidate_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """`model.named_modules()` without the root and without adapter internals."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        children = (*ADAPTER_CHILD_NAMES, *getattr(type(module), "param_dicts", ()),
                    *getattr(type(module), "extra_children", ()))
        skip.extend(f"{name}.{c}" for c in children if c in module._modules)
        yield name, module


def output_head_name(model: torch.nn.Module) -> str | None:
    """Name of the output head that 'all-linear' leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
    if head is None:
        for name, _ in model.named_modules():
            if name == "lm_head" or name.endswith(".lm_head"):
                return name
    return None


def _matches_keys(name: str, keys: list[str] | str) -> bool:
    if isinstance(keys, str):
        return re.fullmatch(keys, name) is not None
    return name in keys or any(name.endswith("." + k) for k in keys)


def _is_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save
    )


def _layer_index(name: str, layers_pattern) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def is_target(cfg: LoraConfig, name: str, targets: list[str] | str) -> bool:
    """peft's rule for one module name; `targets` is `cfg.target_modules` with 'all-linear' resolved."""
    if cfg.exclude_modules and _matches_keys(name, cfg.exclude_modules):
        return False
    if _is_modules_to_save(name, cfg.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # an exact name is not narrowed by layers_to_transform (as peft)
    if not any(name.endswith("." + k) for k in targets):
        return False
    wanted = cfg.layers_to_transform
    if wanted is None:
        return True
    idx = _layer_index(name, cfg.layers_pattern)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def resolve_targets(model: torch.nn.Module, cfg: LoraConfig) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) pairs `cfg` adapts; ConfigError when nothing matches. When some names of
    a target_modules list match no module (a typo beside a right name, or a name of another
    architecture), one warning line names them: the adapter trains on the others, as in peft."""
    modules = list(candidate_modules(model))
    if cfg.target_modules is None:
        raise ConfigError(
            "target_modules is not set: pass module names (e.g. ['q_proj', 'v_proj']), a regex, "
            f"or 'all-linear'. Linear layers in this model: {_linear_examples(modules)}"
        )
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        head = output_head_name(model)
        lin = linear_types()
        targets = [n for n, m in modules if isinstance(m, lin) and n != head]
    found = [(n, m) for n, m in modules if is_target(cfg, n, targets)]
    if not found:
        extra = ""
        if cfg.layers_to_transform is not None:
            extra = f" with layers_to_transform={cfg.layers_to_transform!r}, layers_pattern={cfg.layers_pattern!r}"
        raise ConfigError(
            f"target_modules={cfg.target_modules!r}{extra} matched no module of {type(model).__name__}. "
            f"Linear layers in this model: {_linear_examples(modules)}"
        )
    if isinstance(cfg.target_modules, (list, tuple, set)):
        missing = [k for k in cfg.target_modules
                   if not any(n == k or n.endswith("." + k) for n, _ in modules)]
        if missing:
            log.warning("target_modules: %s matched no module of %s; adapting the modules the other names "
                        "match. Linear layers in this model: %s", ", ".join(map(str, missing)),
                        type(model).__name__, _linear_examples(modules))
    return found


def _linear_examples(modules: list[tuple[str, torch.nn.Module]], limit: int = 8) -> str:
    lin = linear_types()
    names = [n for n, m in modules if isinstance(m, lin)] or [n for n, _ in modules]
    short: list[str] = []
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if leaf not in short:
            short.append(leaf)
    shown = ", ".join(short[:limit]) + (", ..." if len(short) > limit else "")
    example = names[0] if names else "(none)"
    return f"{shown} (full names look like {example!r})" if names else "(none)"


def pattern_value(patterns: dict, name: str, default):
    """peft's rank/alpha pattern lookup: the first key matching the end of `name` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def minimal_suffixes(chosen: list[str], all_names: list[str]) -> list[str]:
    """Shortest dotted suffixes that select exactly `chosen` among `all_names` (peft's rules).

    Used to write an explicit target list into adapter_config.json instead of 'all-linear'.
    """
    chosen_set = set(chosen)
    others = [n for n in all_names if n not in chosen_set]
    out: set[str] = set()
    for name in chosen:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if any(o == suffix or o.endswith("." + suffix) for o in others):
                continue
            out.add(suffix)
            break
    return sorted(out)
