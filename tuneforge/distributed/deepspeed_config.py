"""`deepspeed:` a DeepSpeed JSON config (LLaMA-Factory's examples/deepspeed/ds_z{0,2,3}[_offload]_config.json)
read, checked and its "auto" values filled from the run's config, as transformers'
HfTrainerDeepSpeedConfig.trainer_config_process fills them (batch sizes, accumulation, clipping,
optimizer settings, precision); the values that depend on the model's hidden size (ZeRO's bucket
sizes) are left "auto" for accelerate, which fills them from the model when it prepares it.
Then accelerate's DeepSpeedPlugin(hf_ds_config=...) carries it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import ConfigError

EXTRA = "pip install tuneforge[deepspeed]"


def read_deepspeed_config(deepspeed) -> dict:
    """The JSON mapping of `deepspeed` (a path, or the mapping itself). Raises ConfigError for a
    file that is missing or not a JSON object, or a ZeRO stage other than 0-3."""
    if isinstance(deepspeed, dict):
        config = deepspeed
    else:
        path = Path(deepspeed).expanduser()
        if not path.is_file():
            raise ConfigError(f"config key 'deepspeed': file '{path}' does not exist; give a DeepSpeed JSON config "
                              "(e.g. LLaMA-Factory's examples/deepspeed/ds_z3_config.json)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key 'deepspeed': cannot read '{path}' as JSON ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"config key 'deepspeed': '{path}' must hold a JSON object (DeepSpeed's config)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'deepspeed': zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return config


def fill_auto(config: dict, train, world_size: int, precision: str) -> dict:
    """A copy of DeepSpeed config `config` with its "auto" values taken from training arguments
    `train` (per_device_train_batch_size, gradient_accumulation_steps, max_grad_norm,
    learning_rate, adam_beta1/2, adam_epsilon, weight_decay), `world_size` processes and
    `precision` ("no", "bf16", "fp16"), by transformers' rules. A value the config sets itself
    is kept."""
    filled = copy.deepcopy(config)
    values = {
        "train_micro_batch_size_per_gpu": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": world_size * train.per_device_train_batch_size * train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "optimizer.params.lr": train.learning_rate,
        "optimizer.params.betas": [train.adam_beta1, train.adam_beta2],
        "optimizer.params.eps": train.adam_epsilon,
        "optimizer.params.weight_decay": train.weight_decay,
        "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": train.learning_rate,
        "fp16.enabled": precision == "fp16",
        "bf16.enabled": precision == "bf16",
    }
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = filled
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == "auto":
            node[leaf] = value
    return filled


def deepspeed_plugin(deepspeed, train, world_size: int, precision: str, cpu: bool):
    """accelerate's DeepSpeedPlugin for the config, "auto" values filled (fill_auto).

    Raises ConfigError when DeepSpeed is not installed (naming the extra to install) and on a
    machine without GPUs: accelerate runs DeepSpeed on accelerator devices only."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"config key 'deepspeed': DeepSpeed is not installed; {EXTRA} (or drop deepspeed: "
                          "data parallel under torchrun, or fsdp: full_shard)")
    if cpu:
        raise ConfigError("config key 'deepspeed': accelerate runs DeepSpeed on GPUs only and this machine has "
                          "none; drop deepspeed (several CPU processes: torchrun for data parallel, or fsdp: "
                          "full_shard, which shards on CPUs too)")
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=fill_auto(read_deepspeed_config(deepspeed), train, world_size, precision))
