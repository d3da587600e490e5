"""The Train tab's arguments as a YAML config and the `tuneforge train` line that runs it: the
same file the CLI reads, checked by the same config code (tuneforge.config.build_config), so a
run started in the page equals the CLI run of its previewed command. No gradio here."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from ..config import build_config, read_yaml
from ..errors import ConfigError, TuneforgeError
from . import options

# LLaMA-Factory writes a run's first keys in this order; the rest follow as the form lists them
FIRST = ("model_name_or_path", "stage", "finetuning_type", "dataset_dir", "dataset")


def config_values(form: dict) -> dict:
    """Form fields {key: value} -> the YAML mapping: keys left empty or at their default are left
    out, except the ones every LLaMA-Factory config names (stage, finetuning_type, dataset,
    output_dir). lora_alpha left empty is written as 2 x lora_rank when a rank is set, as the
    page shows it. Shapes: flat {key: scalar, list or dict}."""
    values = {}
    for name, raw in form.items():
        value = options.from_form(name, raw)
        if name in ("stage", "finetuning_type", "dataset", "output_dir") and value is not None:
            values[name] = value
        elif options.differs_from_default(name, value):
            values[name] = value
    ordered = {k: values[k] for k in FIRST if k in values}
    ordered.update((k, v) for k, v in values.items() if k not in ordered)
    return ordered


def yaml_text(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def device_number(value) -> int:
    """The Train tab's device count as an int (empty: 1). Raises ConfigError, one line, for a
    value that is not a whole number of 1 or more."""
    if value is None or value == "":
        return 1
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or number < 1:
        raise ConfigError(f"device count {value!r} must be a whole number of 1 or more (the processes the run "
                          f"starts under torchrun, one per device)")
    return int(number)


def launch_env(devices=1) -> dict[str, str]:
    """The environment a run on `devices` processes adds (tuneforge/distributed/launch.py reads it,
    with LLaMA-Factory's names): {} for 1 (the plain command: the CLI's own choice, one process
    unless several accelerators are visible), else FORCE_TORCHRUN=1 and NPROC_PER_NODE=N.
    Raises ConfigError as device_number does."""
    number = device_number(devices)
    return {} if number == 1 else {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(number)}


def command_line(path: str | Path, devices=1) -> str:
    """The shell line that runs the saved config, as a user would type it (with the environment
    prefix of launch_env for several devices)."""
    prefix = [f"{name}={value}" for name, value in launch_env(devices).items()]
    return shlex.join([*prefix, "tuneforge", "train", str(path)])


def check(values: dict) -> list[str]:
    """The CLI's error lines for this config (empty: valid), each as `tuneforge: error: ...`.
    Only the config is checked here (keys, types, values, combinations); data and model
    problems are found when the run starts and shown from its log the same way."""
    try:
        build_config(dict(values))
    except TuneforgeError as exc:
        return [error_line(m) for m in getattr(exc, "messages", [str(exc)])]
    return []


def error_line(message: str) -> str:
    return f"tuneforge: error: {' '.join(str(message).split())}"


def save(values: dict, path: str | Path) -> Path:
    """Write the YAML (its folder is made). Raises OSError as the file system does."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml_text(values), encoding="utf-8")
    return path


def load(path: str | Path) -> dict:
    """A YAML config's mapping; raises ConfigError (one line naming the file) as the CLI does."""
    return read_yaml(Path(path).expanduser())
