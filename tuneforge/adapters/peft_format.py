"""peft's adapter files: `adapter_config.json` + `adapter_model.safetensors`.

On disk (as peft writes them, no adapter name in the keys):
  base_model.model.<module>.lora_A.weight      (r, in)      our <module>.lora_A.<adapter>
  base_model.model.<module>.lora_B.weight      (out, r)     our <module>.lora_B.<adapter>
  base_model.model.<module>.lora_magnitude_vector  (out,)   our <module>.lora_magnitude_vector.<adapter> (DoRA)
  base_model.model.<module>.lora_embedding_A   (r, num_embeddings)  Embedding's A (no '.weight'), ours lora_A.<adapter>
  base_model.model.<module>.lora_embedding_B   (dim, r)     Embedding's B, ours lora_B.<adapter>
  base_model.model.<module>.base_layer.bias    bias of an adapted module (bias='all'/'lora_only')
  base_model.model.<module>.base_layer.weight  peft's copy of a targeted embedding / lm_head base weight
                                               (save_embedding_layers='auto'); loaded into the base, never written
  base_model.model.<module>.bias               bias of another module (bias='all')
  base_model.model.<module>.<param>            modules_to_save copy (ours: <module>.modules_to_save.<adapter>.<param>)
  other keys a method keeps outside its layers (its record's `extra_tensors`, e.g. VeRA's base_model.vera_A)
This is the only file that knows peft's key layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.distributed.sharded import plain_state_dict
from tuneforge.errors import ConfigError, ModelError
from tuneforge.fileio import json_kind, read_json
from tuneforge.weightfiles import load_safetensors, load_torch_file

from . import inits
from .core import (
    adapter_layers,
    add_adapter,
    delete_adapter,
    get_state,
    method_of,
    require_state,
    saved_modules,
    set_active_adapters,
    set_trainable,
)
from .methods import all_methods, method_of_peft_type
from .peft_config import common_fields

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# tensor names of peft features not implemented yet (a file holding them cannot be computed)
_UNSUPPORTED_KEYS = (".lora_B.bias", "lora_E")


# ---- config ---------------------------------------------------------------------------------------
def config_to_peft(model: nn.Module, name: str, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json of adapter `name`: peft's common fields, then its method's own."""
    cfg = require_state(model, name).configs[name]
    method = method_of(model, name)
    layers = list(adapter_layers(model, name))
    out = common_fields(model, method.peft_type, base_model_name_or_path)
    out.update(method.config_to_peft(model, name, cfg, layers))
    return out


def config_from_peft(raw: dict[str, Any], source: str = CONFIG_NAME) -> Any:
    """The config of a peft adapter_config.json, by its peft_type; ModelError for what we cannot compute."""
    if not isinstance(raw, dict):
        raise ModelError(f"{source} must hold a JSON object ({{...}}), not {json_kind(raw)}")
    if "peft_type" not in raw:  # peft cannot load such a file either; guessing LORA blames the tensors later
        known = ", ".join(dict.fromkeys(m.peft_type for m in all_methods()))
        raise ModelError(f"{source} names no peft_type (the adapter method); add the one it was trained with "
                         f"({known}), e.g. \"peft_type\": \"LORA\"")
    peft_type = raw["peft_type"]
    method = method_of_peft_type(peft_type)
    if method is None or method.config_from_peft is None:
        known = ", ".join(dict.fromkeys(m.peft_type for m in all_methods()))
        raise ModelError(f"{source}: peft_type {peft_type!r} is not supported yet (tuneforge loads {known} adapters)")
    return method.config_from_peft(raw, source)


# ---- save -----------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name` in peft's key layout, fp32 on CPU."""
    st = require_state(model, name)
    out: dict[str, torch.Tensor] = {}
    adapted = set()
    for path, m in adapter_layers(model, name):
        for suffix, t in m.file_tensors(name).items():
            out[file_key(m, path, suffix)] = _to_file(t)
        adapted.add(path)
    params = dict(model.named_parameters())
    for pn in st.biases.get(name, []):
        owner = pn[: -len(".bias")] if pn.endswith(".bias") else ""
        key = f"{owner}.base_layer.bias" if owner in adapted else pn
        out[PREFIX + key] = _to_file(params[pn])
    for path, m in saved_modules(model, name):
        # read off the module (FSDP2, inside distributed.sharded.gathered: whole; its
        # state_dict() would hand back the shards)
        for k, t in plain_state_dict(m.modules_to_save[name]).items():
            out[f"{PREFIX}{path}.{k}"] = _to_file(t)
    for key, t in _extra_tensors(model, name).items():
        out[key] = _to_file(t)
    return out


def _extra_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{file key: tensor} adapter `name`'s method keeps outside its layers (AdapterMethod.extra_tensors)."""
    method = method_of(model, name)
    if method.extra_tensors is None:
        return {}
    cfg = require_state(model, name).configs[name]
    return method.extra_tensors(model, name, cfg, list(adapter_layers(model, name)))


def file_key(layer, path: str, suffix: str) -> str:
    """A layer's tensor key in the file: `base_model.model.<module>.<suffix>`, or `<suffix>` alone for
    a layer whose `peft_keys_at_root` is true (peft's prompt learning: `prompt_embeddings`)."""
    return suffix if getattr(layer, "peft_keys_at_root", False) else f"{PREFIX}{path}.{suffix}"


def _to_file(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.float32)
    return t.to("cpu", copy=True).contiguous()


def save_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    base_model_name_or_path: str | None = None,
    convert_pissa: bool = False,
) -> Path:
    """Write adapter `name` to directory `path` in peft's format; returns the directory.

    convert_pissa=True (PiSSA / OLoRA adapters only) writes the trained adapter as a plain LoRA of
    rank 2r for the ORIGINAL base weights (convert.py), as peft's save_pretrained does with
    `path_initial_model_for_weight_conversion`; without it the file holds the raw adapter, which is
    only right on top of the residual base its init leaves.
    """
    from safetensors.torch import save_file

    require_state(model, name)
    directory = Path(path)
    config = config_to_peft(model, name, base_model_name_or_path)
    tensors = adapter_state_dict(model, name)
    if convert_pissa:
        layers = list(adapter_layers(model, name))
        inits.check_convertible(require_state(model, name).configs[name], name, [m for _, m in layers])
        config = inits.converted_config(config)
        for path_, m in layers:
            for suffix, t in inits.converted_tensors(m, name).items():
                tensors[f"{PREFIX}{path_}.{suffix}"] = _to_file(t)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    method = method_of(model, name)
    if method.save_beside is not None:  # e.g. multi-task LoRA: a plain LoRA per task in <directory>/<task>
        method.save_beside(model, name, require_state(model, name).configs[name], directory, base_model_name_or_path)
    return directory


# ---- load -----------------------------------------------------------------------------------------
def check_adapter_dir(path: str | Path) -> Path:
    """`path` as an adapter folder; ModelError (one line) when it does not exist, is a file, is a
    model folder, or holds no adapter_config.json."""
    directory = Path(path)
    if directory.is_file():
        inside = directory.name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) or (
            directory.parent / CONFIG_NAME).is_file()
        hint = f"give its folder '{directory.parent}'" if inside else f"give the folder holding {CONFIG_NAME}"
        raise ModelError(f"adapter path '{directory}' is a file, not an adapter folder; {hint}")
    if not directory.is_dir():
        raise ModelError(f"adapter path '{directory}' does not exist")
    if not (directory / CONFIG_NAME).exists():
        if (directory / "config.json").is_file():
            raise ModelError(f"'{directory}' is a model folder (it holds config.json), not an adapter: set "
                             f"it as model_name_or_path, or give an adapter folder (holding {CONFIG_NAME})")
        raise ModelError(f"adapter folder '{directory}' has no {CONFIG_NAME}; is it a peft/tuneforge adapter folder?")
    return directory


def read_adapter(path: str | Path) -> tuple[Any, dict[str, torch.Tensor], Path]:
    """Read and check an adapter directory: (config, tensors without the 'base_model.model.' prefix, file).

    Raises ModelError (one line naming the file) for a missing, unreadable, malformed or wrongly
    typed adapter_config.json, and for weights that are missing, truncated, not safetensors, or a
    pickle holding more than tensors (loaded with torch's weights_only unpickler only).
    """
    directory = check_adapter_dir(path)
    cfg_file = directory / CONFIG_NAME
    cfg = config_from_peft(read_json(cfg_file, "adapter config", ModelError), f"adapter config '{cfg_file}'")
    weights = directory / WEIGHTS_NAME
    if weights.exists():
        tensors = load_safetensors(weights, "adapter file")
    elif (directory / LEGACY_WEIGHTS_NAME).exists():
        weights = directory / LEGACY_WEIGHTS_NAME
        tensors = load_torch_file(weights, "adapter file")
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ModelError(f"adapter file '{weights}' holds no table of named tensors; save the adapter again")
    else:
        raise ModelError(f"adapter folder '{directory}' has no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME})")
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    return cfg, tensors, weights


def load_adapter(
    model: nn.Module, path: str | Path, name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load a peft-format adapter as `name` (injecting it unless it exists) and make it the active one.

    Raises ModelError (one line naming the file; the model is left as it was) for everything
    `read_adapter` refuses, a rank that cannot fit in memory, and tensors that do not fit the model.
    """
    cfg, tensors, weights = read_adapter(path)
    st = get_state(model)
    existed = st is not None and name in st.configs
    if not existed:
        try:
            add_adapter(model, cfg, name)
        except ConfigError as e:
            others = list(st.configs) if st is not None else []
            beside = f" beside the adapter(s) {', '.join(map(repr, others))} already on it" if others else ""
            raise ModelError(f"adapter {str(path)!r} cannot be added to {type(model).__name__}{beside}: {e}") from None
    try:
        plan = _plan_copy(model, name, tensors, weights)
    except ModelError:
        if not existed:
            delete_adapter(model, name)
        raise
    with torch.no_grad():
        for dst, src in plan:
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    set_active_adapters(model, [name])
    set_trainable(model, name, is_trainable)
    return model


def _shown(key: str, at_root: set[str] | frozenset[str] = frozenset()) -> str:
    """A key of read_adapter's table as the file spells it (keys outside PREFIX were left as they are;
    `at_root`: keys of layers whose file keys have no prefix at all)."""
    return key if key.startswith("base_model.") or key in at_root else PREFIX + key


def _plan_copy(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: Path):
    """(destination, source) pairs for every tensor in the file; ModelError for anything off."""
    layer_keys: dict[str, tuple[torch.Tensor, str]] = {}
    at_root: set[str] = set()  # keys the file holds without 'base_model.model.'
    adapted = dict(adapter_layers(model, name))
    for path, layer in adapted.items():
        for suffix, dst in layer.peft_tensors(name).items():
            hint = layer.shape_hint(name)
            key = file_key(layer, path, suffix).removeprefix(PREFIX)
            layer_keys[key] = (dst, f" ({path}: {hint})" if hint else f" ({path})")
            if layer.peft_keys_at_root:
                at_root.add(key)
    for key, dst in _extra_tensors(model, name).items():  # read_adapter left keys outside PREFIX as they are
        layer_keys[key.removeprefix(PREFIX)] = (dst, "")
    saved = dict(saved_modules(model, name))
    params = dict(model.named_parameters())
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    unmatched: list[str] = []
    seen: set[str] = set()

    def add(key: str, dst: torch.Tensor, src: torch.Tensor, hint: str = "") -> None:
        if tuple(src.shape) != tuple(dst.shape):
            raise ModelError(
                f"{source}: {_shown(key, at_root)} has shape {tuple(src.shape)} but the model expects "
                f"{tuple(dst.shape)}{hint}; was the adapter trained for another base model or rank?"
            )
        plan.append((dst, src))

    for key, src in tensors.items():
        if key in layer_keys:
            dst, hint = layer_keys[key]
            add(key, dst, src, hint)
            seen.add(key)
            continue
        base_of = key.removesuffix(".base_layer.weight")
        if base_of != key and base_of in adapted:
            # peft saves the base weight of a targeted embedding / lm_head beside its LoRA and loads it
            # back into the base layer (it matters after a vocabulary resize); so do we
            if adapted[base_of].merged_adapters():
                raise ModelError(f"{source}: {key} would overwrite merged weights; unmerge_adapters(model) first")
            add(key, adapted[base_of].weight, src)
            continue
        feature = next((f for f in _UNSUPPORTED_KEYS if f in key), None)
        if feature:
            raise ModelError(f"{source}: {key} uses a LoRA feature not supported yet ({feature.strip('._')})")
        owner = next((p for p in saved if key.startswith(p + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :].removeprefix("modules_to_save.")
            twin = saved[owner].modules_to_save[name]
            own = dict(twin.named_parameters()) | dict(twin.named_buffers())
            if rest in own:
                add(key, own[rest], src)
                seen.add(f"{owner}.{rest}")
                continue
            if rest.startswith("original_module."):  # peft with bias='all' also saves the original's bias
                mine = saved[owner].own_tensors()
                if rest.removeprefix("original_module.") in mine:
                    add(key, mine[rest.removeprefix("original_module.")], src)
                    continue
        bias = key.replace(".base_layer.bias", ".bias") if key.endswith(".base_layer.bias") else key
        if bias.endswith(".bias") and bias in params:
            add(key, params[bias], src)
            continue
        unmatched.append(key)
    if unmatched:
        label = method_of(model, name).peft_type
        raise ModelError(
            f"{source}: {len(unmatched)} tensor(s) match no module of {type(model).__name__} adapted by "
            f"{name!r} as a{'n' * (label[:1] in 'AEIOU')} {label} adapter, e.g. {[_shown(k, at_root) for k in unmatched[:4]]}; "
            "the file does not match its adapter_config.json or this model"
        )
    expected = list(layer_keys)
    for owner, m in saved.items():
        expected += [f"{owner}.{k}" for k in m.modules_to_save[name].state_dict()]
    missing = [k for k in expected if k not in seen]
    if missing:
        raise ModelError(
            f"{source}: {len(missing)} adapter tensor(s) are missing, e.g. {[_shown(k, at_root) for k in missing[:4]]}; "
            "the file does not match its adapter_config.json or this model"
        )
    return plan
