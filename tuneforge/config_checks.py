"""Value checks across config keys: ranges, and combinations that cannot be right, each named by
key in one ConfigError line. Run by config.build_config on every config it makes."""

from __future__ import annotations

import dataclasses
import os
import re

from .adapter_methods import METHOD_KEYS, QUANTIZED_BASE, TASK_ID_METHODS
from .config_lf_keys import validate_lf_keys
from .distributed.plugins import check as distributed_problems
from .errors import ConfigError, config_error
from .train import optimizers
from .train.stages import STAGE_KEYS, STAGES
from .train.trackers import report_targets


def validate(cfg, given: set[str] | frozenset[str] = frozenset()) -> None:
    """Value checks and combinations that cannot be right, named by key, on a config.Config
    (whose sections are dataclasses whose fields carry `choices` and `bounds`). `given`: the
    keys the user set (a key left at its default cannot conflict). Raises ConfigError naming
    every blocker found (errors.config_error: one line each)."""
    problems = blockers(cfg, given)
    if problems:
        raise config_error(problems)


def blockers(cfg, given: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Every problem `validate` finds, one line each, in the order of the checks: a check that
    fails stops only itself (and the checks that need what it checks, the stage's)."""
    out: list[str] = []

    def check(fn, *args) -> bool:
        try:
            fn(*args)
        except ConfigError as exc:
            out.append(str(exc))
            return False
        return True

    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            choices = f.metadata.get("choices")
            value = getattr(obj, f.name)
            if choices and value is not None and value not in choices:
                out.append(f"config key '{f.name}' must be one of {', '.join(map(str, choices))}; got '{value}'")
            bounds = f.metadata.get("bounds")
            if bounds and value is not None and not _within(value, bounds):
                out.append(f"config key '{f.name}' must be {_describe(bounds)}; got {value}")
    if check(_validate_stage, cfg):
        check(_validate_stage_keys, cfg, given)
    check(report_targets, cfg.train.report_to)  # a tracker name, and its package, before anything loads
    out.extend(_combinations(cfg, given))
    out.extend(_lora_variant_problems(cfg))
    out.extend(method_key_problems(cfg.finetune, given))  # each key a method does not read: its own line
    check(_validate_template, cfg.data.template)
    check(optimizers.check, cfg, given)  # use_galore, use_badam, ..., use_llama_pro (train/optimizers/keys.py)
    check(_validate_multitask, cfg)
    check(_validate_streaming, cfg)
    check(_validate_mixing, cfg)
    check(validate_lf_keys, cfg, given)
    check(_validate_placeholders, cfg.data.placeholders)
    check(_validate_adapter_list, cfg.model.adapter_name_or_path)
    out.extend(distributed_problems(cfg))  # fsdp, deepspeed (distributed/plugins.py)
    return list(dict.fromkeys(out))  # a problem two checks find is named once


def _validate_streaming(cfg) -> None:
    """streaming: true: what cannot stream (data/streaming.py), one line."""
    if cfg.data.streaming:
        from .data.streaming import check_streaming

        check_streaming(cfg.data, cfg.train.max_steps)


def _validate_mixing(cfg) -> None:
    """interleave_probs against mix_strategy and the datasets (data/mixing.py), one line."""
    from .data.mixing import check

    check(cfg.data)


def one_per_key(lines: list[str]) -> list[str]:
    """The first line about each key (a later check on a key already refused repeats it), each once."""
    seen, out = set(), []
    for line in dict.fromkeys(lines):
        key = re.match(r"(?:unknown )?config key '([^']+)'", line)
        if key and key.group(1) in seen:
            continue
        seen.add(key and key.group(1))
        out.append(line)
    return out


def _combinations(cfg, given):
    """Keys that contradict each other, one message each."""
    if cfg.data.neat_packing and cfg.data.packing is False:
        yield ("config key 'neat_packing' is true but packing is false; neat_packing "
               "is a kind of packing: drop one of them")
    if cfg.train.bf16 and cfg.train.fp16:
        yield "config keys 'bf16' and 'fp16' are both true; choose one"
    if cfg.train.max_steps <= 0 and cfg.train.num_train_epochs <= 0:
        yield "set 'num_train_epochs' or 'max_steps' to a positive value"
    if "export_quantization" in given and cfg.export.export_format != "gguf":
        yield (f"config key 'export_quantization' is for export_format: gguf (got "
               f"{cfg.export.export_format}); a Hugging Face export takes export_dtype "
               "or export_quantization_bit instead")


def _validate_stage(cfg) -> None:
    """`stage` names a registered stage (train/stages/), and asks nothing it cannot do:
    packed rows for a stage that scores whole sequences."""
    if cfg.finetune.stage not in STAGES:  # the table as it is now: stages may register later
        raise ConfigError(f"config key 'stage' must be one of {', '.join(STAGES)}; "
                          f"got '{cfg.finetune.stage}'")
    stage = STAGES[cfg.finetune.stage]
    if not stage.packing:
        for key in ("packing", "neat_packing"):
            if getattr(cfg.data, key):
                raise ConfigError(f"config key '{key}' is true, but stage: {stage.name} scores "
                                  "whole sequences and pads its batches; drop it or set it to "
                                  "false")


def _validate_stage_keys(cfg, given) -> None:
    """A stage's own key (train.stages.STAGE_KEYS) set for a stage that does not read it, and a
    reference-model stage (dpo) with pissa_init, whose base weights are no longer the model before
    training."""
    stage = cfg.finetune.stage
    for key, spec in STAGE_KEYS.items():
        if key in given and stage not in spec["stages"]:
            names = list(spec["stages"])
            readers = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            raise ConfigError(f"config key '{key}' is read by stage: {readers} (got stage: {stage}); "
                              "drop it or change the stage")
    if STAGES[stage].check is not None:
        STAGES[stage].check(STAGES[stage].settings(cfg))
    if cfg.finetune.pissa_init and STAGES[stage].uses_reference(cfg):
        raise ConfigError(f"config key 'pissa_init' rewrites the base weights, but stage: {stage} takes "
                          "its reference from the base model (adapters disabled); drop pissa_init")


def _validate_placeholders(placeholders: dict | None) -> None:
    """{{key}} in the data is replaced by text: a list or mapping there is a mistake."""
    for key, value in (placeholders or {}).items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            kind = "nothing (null)" if value is None else f"a {type(value).__name__}"
            raise ConfigError(f"config key 'placeholders': the value of '{key}' must be text (it "
                              f"replaces {{{{{key}}}}} in the data); got {kind}")


def _validate_adapter_list(paths: str | None) -> None:
    """Each adapter is merged or loaded once per listing: a path listed twice would apply twice."""
    seen: dict[str, str] = {}
    for path in (p.strip() for p in (paths or "").split(",") if p.strip()):
        real = os.path.realpath(os.path.expanduser(path))
        if real in seen:
            same = "" if seen[real] == path else f" (as '{seen[real]}')"
            raise ConfigError(f"config key 'adapter_name_or_path' lists '{path}' twice{same}; it "
                              "would be applied twice: list each adapter once")
        seen[real] = path


def _parse_bounds(bounds: str) -> tuple[float, float, bool, bool]:
    """"(0, inf)" -> (0.0, inf, low closed? False, high closed? False)."""
    low, high = (float(part) for part in bounds[1:-1].split(","))
    return low, high, bounds[0] == "[", bounds[-1] == "]"


def _within(value: float, bounds: str) -> bool:
    low, high, low_closed, high_closed = _parse_bounds(bounds)
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


def _describe(bounds: str) -> str:
    """Interval in words where it has some: positive, >= 0; else the interval itself."""
    low, high, low_closed, _ = _parse_bounds(bounds)
    if low == 0 and high == float("inf"):
        return ">= 0" if low_closed else "positive"
    if high == float("inf"):
        return f">= {low:g}" if low_closed else f"> {low:g}"
    return f"in {bounds}"


def method_key_problems(finetune, given=None) -> list[str]:
    """One line per finetune key the chosen finetuning_type does not read: a method's own key
    (adapter_methods.METHOD_KEYS) that the config sets, and a key adapter methods share (their
    `AdapterMethod.keys`: lora_rank, lora_dropout, ...) set to other than its default for an
    adapter method that does not read it (lora_rank with ia3). freeze / full configs may carry
    the shared LoRA keys (LLaMA-Factory's often do). `given`: the keys the user set (None: all)."""
    from .adapters.methods import all_methods, method_names

    method, lines = finetune.finetuning_type, []
    for key, spec in METHOD_KEYS.items():
        if (given is None or key in given) and getattr(finetune, key) is not None and method not in spec["methods"]:
            lines.append(f"config key '{key}' needs finetuning_type: {_either(spec['methods'])} "
                         f"(got finetuning_type: {method})")
    if method not in method_names():
        return lines
    reading = {m.name: set(m.keys) for m in all_methods()}
    for f in dataclasses.fields(finetune):
        readers = [name for name, keys in reading.items() if f.name in keys]
        if f.name in METHOD_KEYS or not readers or f.name in reading[method] or getattr(finetune, f.name) == f.default:
            continue
        lines.append(f"config key '{f.name}' needs finetuning_type: {_either(readers)} (got finetuning_type: "
                     f"{method}); remove it")
    return lines


def _either(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _validate_template(name: str | None) -> None:
    """template: one of the named templates (data/template_table.py), checked before the model loads."""
    if name:
        from .data.templates import get_template

        get_template(name)


MULTITASK_STAGES = ("sft", "pt")  # stages whose examples carry a task id (data.load_datasets with multitask)


def _validate_multitask(cfg) -> None:
    """multitask: true (each dataset a task) and the methods that route by task (TASK_ID_METHODS)
    come together, with a token-level stage, two or more datasets, eval datasets among them."""
    data, method = cfg.data, cfg.finetune.finetuning_type
    readers = " or ".join(TASK_ID_METHODS)
    if method in TASK_ID_METHODS and not data.multitask and data.dataset:  # a training config
        raise ConfigError(f"finetuning_type: {method} trains a part per task; set multitask: true and list the "
                          "tasks' datasets in dataset: (e.g. dataset: identity,alpaca_en_demo)")
    if not data.multitask:
        return
    if method not in TASK_ID_METHODS:
        raise ConfigError(f"config key 'multitask' needs finetuning_type: {readers} (a shared adapter plus a part "
                          f"per task; got finetuning_type: {method}, which trains one adapter on all datasets)")
    if cfg.finetune.stage not in MULTITASK_STAGES:
        raise ConfigError(f"config key 'multitask' needs stage: {' or '.join(MULTITASK_STAGES)} (got stage: "
                          f"{cfg.finetune.stage}, whose batches carry no task per token)")
    names = [n.strip() for n in str(data.dataset or "").split(",") if n.strip()]
    if names and len(names) < 2:
        raise ConfigError(f"config key 'multitask' needs two or more datasets in dataset: (each dataset is a "
                          f"task); got '{','.join(names)}'")
    unknown = [n.strip() for n in str(data.eval_dataset or "").split(",") if n.strip() and n.strip() not in names]
    if names and unknown:
        raise ConfigError(f"config key 'eval_dataset' names {', '.join(unknown)}, which is not in dataset: "
                          f"({','.join(names)}); with multitask: true each eval dataset must be one of the tasks")


def _lora_variant_problems(cfg):
    """LoRA's variants (DoRA, PiSSA, LoRA+, LoftQ, rank keys) and a quantized base, one message per problem."""
    ft, model = cfg.finetune, cfg.model
    if ft.finetuning_type != "lora":
        for key in ("use_dora", "pissa_init", "pissa_convert", "create_new_adapter", "loraplus_lr_ratio"):
            if getattr(ft, key) not in (None, False):
                yield (f"config key '{key}' needs finetuning_type: lora "
                       f"(got finetuning_type: {ft.finetuning_type})")
    if ft.pissa_iter != -1 and ft.pissa_iter < 1:
        yield (f"config key 'pissa_iter' must be -1 (full SVD) or at least 1; "
               f"got {ft.pissa_iter}")
    if ft.pissa_convert and not ft.pissa_init:
        yield ("config key 'pissa_convert' needs pissa_init: true")
    if ft.pissa_init and model.adapter_name_or_path and not ft.create_new_adapter:
        yield ("config key 'pissa_init' starts a new adapter, but adapter_name_or_path "
               "continues training an existing one; set create_new_adapter: true (the "
               "listed adapters are then merged first) or drop pissa_init")
    rank_keys = [k for k in ("lora_rank_pattern", "lora_rank_schedule", "lora_rank_levels") if getattr(ft, k)]
    if rank_keys and model.adapter_name_or_path and not ft.create_new_adapter:
        yield (f"config key '{rank_keys[0]}' sets the ranks of a new adapter, but adapter_name_or_path "
               "continues training an existing one (its ranks are in its adapter_config.json); set "
               f"create_new_adapter: true (the listed adapters are then merged first) or drop {rank_keys[0]}")
    if ft.loraplus_lr_ratio is not None and ft.loraplus_lr_ratio <= 0:
        yield (f"config key 'loraplus_lr_ratio' must be positive (e.g. 16); "
               f"got {ft.loraplus_lr_ratio}")
    if model.quantization_bit is not None and ft.finetuning_type not in QUANTIZED_BASE:
        names = ", ".join(QUANTIZED_BASE[:-1]) + " or " + QUANTIZED_BASE[-1]
        yield (f"config key 'quantization_bit' trains an adapter on a frozen quantized base; it "
               f"needs finetuning_type: {names} (got {ft.finetuning_type})")
    if ft.loftq_iter and ft.finetuning_type != "lora":
        yield (f"config key 'loftq_iter' initialises LoRA; it needs finetuning_type: lora "
               f"(got finetuning_type: {ft.finetuning_type})")
    if ft.pissa_init and model.quantization_bit is not None:
        yield ("config key 'pissa_init' rewrites the base weights, which quantization_bit "
               "freezes in 4/8 bits; use loftq_iter for a quantized base, or drop one")
    if ft.loftq_iter and model.quantization_bit is None:
        yield ("config key 'loftq_iter' initialises LoRA for a quantized base; set "
               "quantization_bit: 4 (or 8) too")
