"""Config building blocks kept apart from config.py (which holds the sections a run's training
reads): the `_f` field helper and the sections of `tuneforge eval` benchmarks, `tuneforge api` and
training in several processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


def _f(default: Any = None, help: str = "", choices: tuple | None = None, factory=None,
       bounds: str | None = None):
    """A dataclass field whose help text becomes `--help` output and web UI tooltips.
    `bounds` is the interval a number must lie in, e.g. "(0, inf)" or "[0, 1)"
    (config_checks.validate enforces it for every key that has one)."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if bounds:
        meta["bounds"] = bounds
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EvaluationArguments:
    """Multiple-choice benchmarks, with LLaMA-Factory's eval keys (`tuneforge eval` with task:)."""
    task: Optional[str] = _f(
        None, "Benchmark and split in task_dir, e.g. mmlu_test, ceval_validation, cmmlu_test: "
        "CSV folders (or <name>.zip) as LLaMA-Factory's evaluation/ folder holds them.")
    task_dir: str = _f("evaluation", "Folder holding one folder per benchmark (mmlu/, ceval/, ...).")
    n_shot: int = _f(5, "Solved examples of the same subject before each question (from the dev split).", bounds="[0, inf)")
    lang: str = _f("en", "Language of the benchmark prompt.", ("en", "zh"))
    save_dir: Optional[str] = _f(
        None, "Where benchmark results (benchmark_results.json) go. Empty: output_dir.")
    batch_size: int = _f(4, "Questions per forward pass in multiple-choice benchmarks.", bounds="(0, inf)")


@dataclass
class ServeArguments:
    api_host: Optional[str] = _f(
        None, "Address `tuneforge api` binds; --host wins, then this, then the API_HOST environment "
        "variable. Empty: 127.0.0.1 (this machine only).")
    api_port: Optional[int] = _f(
        None, "Port of `tuneforge api`; --port wins, then this, then API_PORT. Empty: 8000.", bounds="[1, 65535]")
    api_key: Optional[str] = _f(
        None, "Bearer token every `tuneforge api` request must send. Empty: the API_KEY environment "
        "variable; neither set: no authentication.")
    api_max_batch_size: int = _f(
        8, "Most requests `tuneforge api` generates for in one batch (they may name different adapters).", bounds="(0, inf)")


@dataclass
class DistributedArguments:
    """Several processes (torchrun, `accelerate launch`, FORCE_TORCHRUN=1): LLaMA-Factory's (transformers')
    keys, passed to accelerate's plugins by tuneforge/distributed/plugins.py."""
    fsdp: Optional[Union[bool, str]] = _f(
        None, "FSDP2 sharding through accelerate (several processes): true, or transformers' options "
        "'full_shard' (parameters, gradients and optimizer state sharded), 'shard_grad_op' (kept whole between "
        "forward and backward), 'offload' (sharded parameters on the CPU), 'auto_wrap' (each decoder layer its own "
        "unit: always so); e.g. 'full_shard auto_wrap'. Empty or false: data parallel (DDP).")
    fsdp_config: Optional[Union[dict, str]] = _f(
        None, "FSDP settings as transformers reads them (a mapping, or a JSON file): version (2; fsdp_version), "
        "reshard_after_forward, cpu_offload, auto_wrap_policy (TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP), "
        "transformer_layer_cls_to_wrap, min_num_params, activation_checkpointing, state_dict_type, "
        "cpu_ram_efficient_loading; an fsdp_ prefix is dropped.")
    deepspeed: Optional[Union[dict, str]] = _f(
        None, "A DeepSpeed JSON config (LLaMA-Factory's examples/deepspeed/ds_z{0,2,3}[_offload]_config.json) or "
        "its mapping: read and checked, its \"auto\" values filled from this config; training with it is refused "
        "for now (use fsdp: full_shard, FSDP2's sharding as ZeRO-3's).")
    ddp_timeout: int = _f(1800, "Seconds before a distributed collective times out (the process group's "
                          "timeout).", bounds="(0, inf)")
    ddp_find_unused_parameters: Optional[bool] = _f(
        None, "DDP: look for parameters that got no gradient in each step (slower; needed when a step leaves some "
        "unused). Empty: false (LLaMA-Factory's setting for LoRA, accelerate's default).")
