"""Which config keys the Train tab shows for a fine-tuning method and a stage, read from the
registry's tables (adapter_methods.METHOD_KEYS, train.stages.STAGES[...].keys, the sections of
config.py), and how a form value becomes a YAML value. No gradio here."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import yaml

from ..adapter_methods import METHOD_KEYS, METHODS
from ..config import all_fields
from ..config_values import coerce
from ..train.stages import STAGES
from .key_help_zh import KEY_HELP_ZH

# keys of config.py's finetune section that only some methods read (the others are refused by
# config_checks or change nothing): shown under those methods only
LORA_FAMILY = ("lora", "lora_ensemble", "lora_dynamic", "lora_multitask", "lora_moe", "adalora")
LORA_ONLY = ("use_rslora", "use_dora", "pissa_init", "pissa_iter", "pissa_convert", "loraplus_lr_ratio",
             "loraplus_lr_embedding", "loftq_iter", "create_new_adapter")
ADAPTER_KEYS = ("lora_target", "additional_target", "lora_dropout")
FREEZE_KEYS = ("freeze_trainable_layers", "freeze_trainable_modules")
# main fields that only adapter methods read: hidden and not written for full / freeze
RANK_KEYS = ("lora_rank", "lora_alpha")
NO_ADAPTER = ("full", "freeze")
# keys the Train tab has its own fields for (hyperparameters, data, output), not repeated per method
MAIN_KEYS = ("model_name_or_path", "stage", "finetuning_type", "dataset_dir", "dataset", "num_train_epochs",
             "max_steps", "cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps",
             "learning_rate", "lora_rank", "lora_alpha", "logging_steps", "save_steps", "val_size",
             "output_dir", "resume_from_checkpoint")


def methods() -> list[str]:
    """finetuning_type values in the order of config.py's choices (lora, freeze, full, then the rest)."""
    return list(all_fields()["finetuning_type"][1].metadata["choices"])


def stages() -> list[str]:
    return list(STAGES)


def method_keys(method: str) -> list[str]:
    """The option keys shown for `method` (a finetuning_type): its own keys from METHOD_KEYS plus
    the shared finetune keys that it reads."""
    keys: list[str] = []
    if method == "freeze":
        keys += FREEZE_KEYS
    elif method in METHODS:
        keys += ADAPTER_KEYS
        if method == "lora":
            keys += LORA_ONLY
    keys += [name for name, spec in METHOD_KEYS.items() if method in spec["methods"]]
    return keys


def stage_keys(stage: str) -> list[str]:
    """The option keys only `stage` reads (its Stage record's `keys`)."""
    return list(STAGES[stage].keys) if stage in STAGES else []


def all_option_keys() -> list[str]:
    """Every key some method or stage shows, each once, in a stable order."""
    seen: dict[str, None] = {}
    for method in methods():
        seen.update(dict.fromkeys(method_keys(method)))
    for stage in stages():
        seen.update(dict.fromkeys(stage_keys(stage)))
    return [k for k in seen if k not in MAIN_KEYS]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """How to show one key: kind is "choice", "bool", "int", "float" or "text" (lists, dicts and
    other values are typed as YAML text, e.g. `[{r: 4}, {r: 16}]`)."""

    name: str
    kind: str
    default: object
    help: str
    choices: tuple = ()
    optional: bool = False


@lru_cache(maxsize=None)
def spec(name: str) -> KeySpec:
    _, f = all_fields()[name]
    default = f.default if f.default is not dataclasses.MISSING else None
    type_text = str(f.type)
    optional = default is None or "Optional" in type_text
    help_text = f.metadata.get("help", "")
    if "bounds" in f.metadata:
        help_text += f" Range: {f.metadata['bounds']}."
    choices = tuple(f.metadata.get("choices", ()))
    if choices:
        kind = "choice"
    elif type_text in ("bool", "Optional[bool]"):
        kind = "bool" if not optional else "choice"
        choices = ("", "true", "false") if optional else ()
    elif type_text in ("int", "Optional[int]"):
        kind = "int"
    elif type_text in ("float", "Optional[float]"):
        kind = "float"
    else:
        kind = "text"
    return KeySpec(name, kind, default, help_text, choices, optional)


def key_help(name: str, lang: str = "en") -> str:
    """The help line of registry key `name` in `lang`: the registry's English help (with its range),
    or in "zh" the line of key_help_zh.KEY_HELP_ZH with the same range (English where a key has no
    Chinese line yet; the tests name such a key)."""
    if lang != "zh" or name not in KEY_HELP_ZH:
        return spec(name).help
    bounds = all_fields()[name][1].metadata.get("bounds")
    return KEY_HELP_ZH[name] + (f" 取值范围：{bounds}。" if bounds else "")


def form_default(name: str):
    """The value a form field starts at for key `name` (None: empty)."""
    s = spec(name)
    if s.kind == "choice":
        return "" if s.default is None else _as_text(s.default)
    if s.kind == "text":
        return "" if s.default is None else _as_text(s.default)
    return s.default


def from_form(name: str, value):
    """The YAML value of a form field (None: leave the key out, its default applies)."""
    s = spec(name)
    if value is None or value == "":
        return None
    if s.kind in ("choice", "text") and isinstance(value, str):
        if s.kind == "choice" and all(isinstance(c, str) for c in s.choices) and value in s.choices \
                and value not in ("true", "false"):
            parsed = value
        else:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            if "str" in str(all_fields()[name][1].type) and not isinstance(parsed, (list, dict)) \
                    and parsed is not None and not isinstance(parsed, bool):
                parsed = value  # a name stays the text typed (`lora_target: 1` is not a number)
        value = parsed
    if s.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def to_form(name: str, value):
    """A YAML value as the form field of key `name` shows it."""
    s = spec(name)
    if s.kind in ("choice", "text"):
        return "" if value is None else _as_text(value)
    return value


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return str(value)


def differs_from_default(name: str, value) -> bool:
    """Whether a YAML value changes anything (a value equal to the key's default is left out,
    so a saved file stays short and a method's unused keys never appear)."""
    if value is None:
        return False
    default = spec(name).default
    try:
        return coerce(name, value, all_fields()[name][1].type) != default
    except Exception:  # a bad value: keep it, so the config check names it
        return True
