"""The config's distributed keys (config_sections.DistributedArguments: LLaMA-Factory's, i.e.
transformers' TrainingArguments keys) as accelerate's plugins and kwargs handlers, the way
transformers' Trainer builds its Accelerator (TrainingArguments._process_fsdp_args,
Trainer._build_accelerator_args):

- `fsdp` / `fsdp_config` -> FullyShardedDataParallelPlugin(fsdp_version=2, ...) (FSDP2, torch's
  fully_shard, applied by accelerate.prepare);
- `ddp_timeout` -> InitProcessGroupKwargs(timeout=...), the process group's collective timeout;
- `ddp_find_unused_parameters` -> DistributedDataParallelKwargs(find_unused_parameters=...);
- `deepspeed`: its JSON read and checked, "auto" values filled by deepspeed_config.py; training
  with it refused for now (deepspeed_config.refuse_deepspeed says what the loop lacks).

`check(dist, train)` finds the config's mistakes at load time (one line each); `make_accelerator`
builds the run's Accelerator."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

from ..errors import ConfigError, config_error

log = logging.getLogger("tuneforge")

# transformers' `fsdp` options (trainer_utils.FSDPOption) that FSDP2 has: what each sets in fsdp_config
FSDP_OPTIONS = {"full_shard": ("reshard_after_forward", True), "shard_grad_op": ("reshard_after_forward", False),
                "offload": ("cpu_offload", True), "auto_wrap": None}
FSDP1_ONLY = ("hybrid_shard", "hybrid_shard_zero2", "no_shard")
# fsdp_config keys (without the fsdp_ prefix) that take effect with FSDP2, as transformers reads them
FSDP_CONFIG_KEYS = ("version", "reshard_after_forward", "cpu_offload", "auto_wrap_policy", "min_num_params",
                    "transformer_layer_cls_to_wrap", "activation_checkpointing", "state_dict_type",
                    "cpu_ram_efficient_loading", "xla")
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")


def fsdp_enabled(fsdp) -> bool:
    return fsdp is True or (isinstance(fsdp, str) and fsdp.strip().lower() not in ("", "false"))


def _bool(key: str, value, problems: list[str]) -> bool:
    """`value` as true or false; anything else is noted in `problems` (and reads as false)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    problems.append(f"{key} must be true or false, got {value!r}")
    return False


def read_fsdp_config(fsdp_config) -> dict:
    """fsdp_config as a mapping (a JSON file's, for a path) with the fsdp_ prefix dropped.
    Raises ConfigError for a file that is missing or not a JSON mapping."""
    if fsdp_config is None:
        return {}
    if isinstance(fsdp_config, str):
        path = Path(fsdp_config).expanduser()
        try:
            fsdp_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key 'fsdp_config': cannot read '{path}' as JSON ({type(exc).__name__}); "
                              "give a JSON file of FSDP settings or a mapping") from None
        if not isinstance(fsdp_config, dict):
            raise ConfigError(f"config key 'fsdp_config': '{path}' must hold a JSON object of FSDP settings")
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in fsdp_config.items()}


def fsdp_plugin_args(fsdp, fsdp_config) -> dict | None:
    """accelerate's FullyShardedDataParallelPlugin keyword arguments for `fsdp` (true, or
    transformers' options such as "full_shard auto_wrap", space or comma separated) and
    `fsdp_config` (a mapping or a JSON file), as transformers 5 computes them for FSDP2; None when
    fsdp is off. Raises ConfigError naming every option or setting FSDP2 does not have: one line
    for fsdp_config's settings (each named), one for fsdp's options (errors.ConfigErrors when
    both are wrong)."""
    if not fsdp_enabled(fsdp):
        if fsdp_config:
            raise ConfigError("config key 'fsdp_config' needs fsdp: true (or fsdp: 'full_shard auto_wrap'); "
                              "set fsdp or drop fsdp_config")
        return None
    config = read_fsdp_config(fsdp_config)
    settings: list[str] = []  # what is wrong in fsdp_config, one entry per setting
    options: list[str] = []  # what is wrong in fsdp
    version = config.get("version", 2)
    if str(version) != "2":
        settings.append(f"version {version} is not available; tuneforge shards with FSDP2 (torch's fully_shard): "
                        "set version: 2 or drop it")
    if config.get("xla") not in (None, False):
        settings.append("xla is for TPUs, which tuneforge does not train on; drop it")
    for item in ([] if fsdp is True else fsdp.replace(",", " ").split()):
        item = item.lower()
        if item in FSDP1_ONLY:
            options.append(f"'{item}' is an FSDP1 strategy")
        elif item not in FSDP_OPTIONS:
            options.append(f"unknown option '{item}'")
        elif FSDP_OPTIONS[item] is not None:
            config.setdefault(*FSDP_OPTIONS[item])
    policy = str(config.get("auto_wrap_policy", WRAP_POLICIES[0])).upper()
    if policy not in WRAP_POLICIES:
        settings.append(f"auto_wrap_policy must be one of {', '.join(WRAP_POLICIES)}, "
                        f"got {config['auto_wrap_policy']!r}")
    state_dict_type = str(config.get("state_dict_type", "FULL_STATE_DICT")).upper()
    if state_dict_type not in STATE_DICT_TYPES:
        settings.append(f"state_dict_type must be one of {', '.join(STATE_DICT_TYPES)}, "
                        f"got {config['state_dict_type']!r}")
    args = {"fsdp_version": 2, "auto_wrap_policy": policy, "state_dict_type": state_dict_type,
            "reshard_after_forward": _bool("reshard_after_forward", config.get("reshard_after_forward", True),
                                           settings),
            "cpu_ram_efficient_loading": _bool("cpu_ram_efficient_loading",
                                               config.get("cpu_ram_efficient_loading", False), settings)}
    if _bool("cpu_offload", config.get("cpu_offload", False), settings):
        args["cpu_offload"] = True
    if "activation_checkpointing" in config:
        args["activation_checkpointing"] = _bool("activation_checkpointing", config["activation_checkpointing"],
                                                 settings)
    min_params = config.get("min_num_params", 0)
    if isinstance(min_params, bool) or not str(min_params).strip().isdigit():
        settings.append(f"min_num_params must be a whole number of parameters, got {min_params!r}")
    elif policy == "SIZE_BASED_WRAP" and int(min_params) > 0:
        args["min_num_params"] = int(min_params)
    layers = config.get("transformer_layer_cls_to_wrap")
    if layers is not None and not isinstance(layers, str) and not (
            isinstance(layers, list) and all(isinstance(name, str) for name in layers)):
        settings.append(f"transformer_layer_cls_to_wrap must be a layer class name or a list of them, "
                        f"got {layers!r}")
    elif policy == "TRANSFORMER_BASED_WRAP" and layers:
        args["transformer_cls_names_to_wrap"] = ",".join([layers] if isinstance(layers, str) else layers)
    unknown = [k for k in config if k not in FSDP_CONFIG_KEYS]
    if unknown:  # last: its list of the settings there are ends the line
        names = ", ".join(f"'{k}'" for k in unknown)
        settings.append(f"{names} {'is not an FSDP2 setting' if len(unknown) == 1 else 'are not FSDP2 settings'} "
                        f"tuneforge passes on; use {', '.join(FSDP_CONFIG_KEYS)}")
    lines = []
    if settings:
        lines.append(f"config key 'fsdp_config': {'; '.join(settings)}")
    if options:
        lines.append(f"config key 'fsdp': {'; '.join(options)}; FSDP2 has full_shard, shard_grad_op, offload, "
                     "auto_wrap (e.g. fsdp: 'full_shard auto_wrap')")
    if lines:
        raise config_error(lines)
    return args


def check(cfg) -> list[str]:
    """The distributed keys' mistakes in Config `cfg`, one line each, found when the config loads
    (files are read here, so that every process of a launch fails the same way before any work)."""
    from .deepspeed_config import read_deepspeed_config

    dist, train = cfg.distributed, cfg.train
    problems = []
    fsdp = None
    try:
        fsdp = fsdp_plugin_args(dist.fsdp, dist.fsdp_config)
    except ConfigError as exc:
        problems.extend(getattr(exc, "messages", [str(exc)]))  # ConfigErrors: fsdp_config's and fsdp's
    if dist.deepspeed is not None:
        if fsdp_enabled(dist.fsdp):
            problems.append("config keys 'deepspeed' and 'fsdp' are both set; choose one engine")
        try:
            read_deepspeed_config(dist.deepspeed)
        except ConfigError as exc:
            problems.append(str(exc))
    if fsdp and fsdp.get("activation_checkpointing") and train.gradient_checkpointing:
        problems.append("config keys 'gradient_checkpointing' and fsdp_config's activation_checkpointing are both "
                        "on; keep fsdp_config's (FSDP's own, without an extra all-gather) and drop the other")
    return problems


def accelerator_kwargs(cfg, precision: str, cpu: bool) -> dict:
    """Accelerator(**kwargs) for Config `cfg`: precision, the process group's timeout, DDP's
    settings and the FSDP or DeepSpeed plugin (`cpu`: no accelerator device; gloo between
    processes). Raises ConfigError for deepspeed (not driven yet: deepspeed_config.refuse_deepspeed)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    dist = cfg.distributed

    # empty: false, LLaMA-Factory's setting for LoRA in DDP (and accelerate's default)
    find_unused = bool(dist.ddp_find_unused_parameters)
    kwargs = {"mixed_precision": precision, "cpu": cpu,
              "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=dist.ddp_timeout)),
                                  DistributedDataParallelKwargs(find_unused_parameters=find_unused)]}
    fsdp = fsdp_plugin_args(dist.fsdp, dist.fsdp_config)
    if fsdp is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**fsdp)
    if dist.deepspeed is not None:
        from .deepspeed_config import refuse_deepspeed

        refuse_deepspeed()
    return kwargs


def make_accelerator(cfg, precision: str, cpu: bool):
    """The run's Accelerator for Config `cfg` (accelerator_kwargs). accelerate keeps one process-wide state; a second train() in the same
    (single-device) process, e.g. from a notebook, may ask for other settings, so that state starts
    afresh. On CPUs (gloo) accelerate sets up DDP even when given an FSDP plugin (its state marks
    FSDP for GPU-like devices only); FSDP2 itself (torch's fully_shard over a CPU device mesh) runs
    on gloo, so the state is marked FSDP there, and accelerate.prepare shards the model."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if AcceleratorState._shared_state and hasattr(AcceleratorState, "_reset_state"):
        if AcceleratorState().distributed_type == DistributedType.NO:
            AcceleratorState._reset_state()
    kwargs = accelerator_kwargs(cfg, precision, cpu)
    accelerator = Accelerator(**kwargs)
    plugin = kwargs.get("fsdp_plugin")
    state = accelerator.state
    if plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
        AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if precision != "no":
            plugin.set_mixed_precision(precision)
    elif plugin is not None and state.distributed_type != DistributedType.FSDP:
        log.info("fsdp: this run has one process, so there is nothing to shard: it trains without FSDP "
                 "(start several: FORCE_TORCHRUN=1 NPROC_PER_NODE=2 tuneforge train ..., or torchrun)")
    return accelerator


def name_layers_to_wrap(accelerator, model) -> None:
    """The layer classes FSDP2's transformer-based wrapping makes units of, where the user named
    none (fsdp_config.transformer_layer_cls_to_wrap always wins): the model's `_no_split_modules`
    (else the classes transformers checkpoints, GradientCheckpointingLayer subclasses) less any
    class that holds the input embedding. accelerate 1.15 shards the input embedding as a unit of
    its own after the layers, and fails inside fully_shard ("value was None") when a wrapped layer
    class already holds it (BERT's BertEmbeddings: `stage: cls` under fsdp)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "transformer_cls_names_to_wrap", None):
        return
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:
            return
        names = {type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    holders = {type(m).__name__ for m in model.modules()
               if embed is not None and m is not embed and any(c is embed for c in m.modules())}
    if names - holders:
        plugin.transformer_cls_names_to_wrap = sorted(names - holders)
