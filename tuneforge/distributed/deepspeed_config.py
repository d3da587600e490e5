"""`deepspeed:` a DeepSpeed JSON config (LLaMA-Factory's examples/deepspeed/ds_z{0,2,3}[_offload]_config.json)
read, checked and its "auto" values filled from the run's config, as transformers'
HfTrainerDeepSpeedConfig.trainer_config_process fills them (batch sizes, accumulation, clipping,
optimizer settings, precision); the values that depend on the model's hidden size (ZeRO's bucket
sizes) are left "auto" for accelerate, which fills them from the model when it prepares it.
Training with it is refused for now (refuse_deepspeed says why), after the file is checked."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import ConfigError


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


def refuse_deepspeed() -> None:
    """Raises ConfigError: tuneforge's loop does not drive DeepSpeed's engine yet. What it lacks:
    the engine scales each micro-batch's loss by 1/gradient_accumulation_steps and steps itself at
    the accumulation boundary (the loop normalises over the whole step and steps the optimizer),
    and ZeRO-3 leaves each weight partitioned, so saving needs deepspeed.zero.GatheredParameters.
    None of it can be checked on CPUs: DeepSpeed 0.19.8 runs ZeRO-2/3 in 2 gloo processes on its CPU
    accelerator through deepspeed.initialize, but accelerate 1.15 does not drive it there
    (Accelerator(cpu=True) passes the plugin over and runs DDP, accelerate/state.py:201; cpu=False
    without GPUs leaves num_processes=1, process_index=0 on every process, state.py:288; README
    "Many devices"). Once it is driven, accelerate's DeepSpeedPlugin(hf_ds_config=fill_auto(...))
    carries the config (DeepSpeed 0.19.8 installs from PyPI as a pure-Python sdist in ~15 s)."""
    raise ConfigError("config key 'deepspeed': tuneforge's training loop does not drive DeepSpeed's engine yet; "
                      "use fsdp: full_shard (FSDP2 shards weights, gradients and optimizer state as ZeRO-3 does; "
                      "'full_shard offload' as ZeRO-3 offload) or drop deepspeed (data parallel)")
