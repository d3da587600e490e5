"""The method registry: one `AdapterMethod` record per adapter method, registered with one call.

A method's own file ends with

    register_method(AdapterMethod(
        name="ia3", peft_type="IA3", config_class=IA3Config, layer_class=IA3Layer,
        layers={nn.Linear: IA3Linear, Conv1D: IA3Conv1D},
        config_to_peft=..., config_from_peft=..., from_finetune_args=..., keys=(...),
    ))

`name` is the `finetuning_type` of the YAML config and, upper-cased as peft spells it, the
`peft_type` of adapter_config.json. `layers` maps base-layer types to the method's layer classes
(each a subclass of `layer_class`, which implements the adapter-layer protocol in layer.py); a
method that changes the model rather than its layers (prefix / prompt tuning) gives
`inject(model, config, name)` instead. `add_adapter(model, cfg)` dispatches on the config's class,
`load_adapter` on the file's peft_type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuneforge.errors import ConfigError

from .registry import register_layer


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    """finetuning_type in YAML configs (lower case), e.g. 'lora', 'ia3'."""
    peft_type: str
    """peft's `peft_type` in adapter_config.json, e.g. 'LORA', 'IA3'."""
    config_class: type
    """The method's config dataclass (peft's field names)."""
    layer_class: type | None = None
    """The method's AdapterLayer mixin: every adapted layer of this method is an instance of it."""
    layers: dict[type, type] = field(default_factory=dict)
    """Base-layer type -> adapter layer class (a subclass of both)."""
    inject: Callable[[Any, Any, str], None] | None = None
    """Model-level hook (model, config, name) for methods without per-layer wrappers; a method that
    gives both `inject` and `layers` (MAM: a prefix plus bottleneck layers) is injected first, then its
    layers are adapted as usual (targets planned and checked before either step changes the model)."""
    config_to_peft: Callable[[Any, str, Any, list], dict] | None = None
    """(model, adapter name, config, [(path, layer)]) -> the method's fields of adapter_config.json."""
    config_from_peft: Callable[[dict, str], Any] | None = None
    """(adapter_config.json as a dict, source for messages) -> config; ModelError for what cannot load."""
    from_finetune_args: Callable[[Any], Any] | None = None
    """The YAML config's `finetune` section -> the method's config (`tuneforge train`)."""
    fit_to_model: Callable[[Any, Any, Any], Any] | None = None
    """(finetune section, model, config made by `from_finetune_args`) -> that config completed from
    the model it will be added to, for YAML keys whose meaning depends on the model's structure
    (LoRA's per-layer ranks: a depth ramp needs the number of layers, a level the module names);
    ConfigError, one line naming the key, for what the model cannot give. Called by
    `config_from_finetune_args` on the base model, before the adapter is added."""
    keys: tuple[str, ...] = ()
    """Keys of the YAML config's finetune section this method reads (their help: config.py's key table)."""
    prefix: str = ""
    """Class-name prefix of derived layer classes ('Lora' -> LoraMyLinear); default: name capitalised."""
    label: str = ""
    """The method's name in messages ('LoRA', 'IA3'); default: `name`."""
    resolve_targets: Callable[[Any, Any], list] | None = None
    """(model, config) -> [(path, module)] to adapt; default: targets.resolve_targets (peft's rules)."""
    check_targets: Callable[[list, Any], None] | None = None
    """([(path, module)], config) -> None: ConfigError for a plan that cannot work (e.g. LoRA's memory check)."""
    remove: Callable[[Any, str], None] | None = None
    """(model, adapter name): undo `inject` when the adapter is deleted or unloaded."""
    shared: Callable[[Any, Any, str, list], Any] | None = None
    """(model, config, adapter name, [(path, module)] targets) -> state every layer of the adapter
    shares (VeRA's frozen random projections), made once by add_adapter after the plan is checked and
    before any layer changes; each layer then gets `add_from_config(name, cfg, path, shared=<it>)`."""
    extra_tensors: Callable[[Any, str, Any, list], dict] | None = None
    """(model, adapter name, config, [(path, layer)]) -> {key in the adapter file: tensor} for tensors
    the adapter keeps outside its layers' `peft_tensors` (VeRA's `base_model.vera_A`): save_adapter
    writes them, load_adapter copies the file's into them in place (a missing one is an error)."""
    training_loss: Callable[[Any, str, Any], Any] | None = None
    """(model, adapter name, config) -> a 0-dim tensor (with autograd) the training loop adds to each
    optimizer step's loss while the adapter trains (a method's regulariser: AdaLoRA's orthogonality
    term), or None; not part of the logged loss. Run once per step, on the last micro-batch."""
    forward_loss: Callable[[Any, str, Any], Any] | None = None
    """(model, adapter name, config) -> a 0-dim tensor (with autograd) that depends on the forward
    passes run since the hook was last called (the MoE LoRA router's load-balancing loss, which
    depends on each micro-batch's routing), or None; the hook claims what those forwards recorded.
    The training loop calls it after every micro-batch's forward and adds the term divided by
    gradient_accumulation_steps to that micro-batch's backward, so a step gets the mean over its
    micro-batches; not part of the logged loss. (`training_loss`, by contrast, runs once per step.)"""
    after_step: Callable[[Any, str, Any, int, int], None] | None = None
    """(model, adapter name, config, step, total_steps): called by the training loop once per optimizer
    step while the adapter trains, after `optimizer.step()` and before the gradients are cleared
    (`step` counts from 1 to `total_steps`); for methods that change their own structure while
    training (AdaLoRA's rank allocator)."""
    training_state: Callable[[Any, str, Any], dict] | None = None
    """(model, adapter name, config) -> {key: tensor} of state the method keeps while training outside
    its parameters (AdaLoRA's importance scores and kept-rank masks): every checkpoint saves it
    (adapter_training_state.safetensors), so a resumed run continues as the uninterrupted one."""
    load_training_state: Callable[[Any, str, Any, dict], None] | None = None
    """(model, adapter name, config, {key: tensor} as `training_state` gave) -> None: put it back when
    a run resumes from a checkpoint; CheckpointError (one line) for state that does not fit."""
    before_step: Callable[[Any, str, Any, int, int], None] | None = None
    """(model, adapter name, config, step, total_steps): called by the training loop once per optimizer
    step while the adapter trains, before that step's first micro-batch runs (`step` counts from 1 to
    `total_steps`, so a resumed run gets the step it continues with); for methods whose forward
    depends on the step (Dynamic LoRA's rank schedule). Paired with `after_step`, it may also keep
    what the optimizer must not change this step and put it back there."""
    after_training: Callable[[Any, str, Any, Callable[[], dict], Callable[[str], None]], dict | None] \
        | None = None
    """(model, adapter name, config, evaluate, report): called by the training loop once after the
    last step and the final evaluation, only when the run has an eval split. `evaluate()` returns the
    eval means over the whole eval split ({"loss": ..., <stage metrics>}, model in eval mode);
    `report(line)` prints a line on the main process. Returns entries for train_results.json (or
    None); for methods that can be evaluated in several forms (Dynamic LoRA: eval loss by rank).
    The hook leaves the adapter as it found it."""
    reads_data_section: bool = False
    """True: `from_finetune_args(finetune, data)` also gets the YAML config's data section, for a
    config that depends on what the run trains on (multi-task LoRA: one task per name in `dataset:`)."""
    batch_context: Callable[[Any, str, Any, dict], Any] | None = None
    """(model, adapter name, config, batch) -> a context manager the training loop enters around the
    forward and backward of each batch (train and eval; training_hooks.batch_context), through which a
    batch's side information (data.collate.SIDE_KEYS, e.g. `task_ids`, never given to the model)
    reaches the adapter's layers; it removes what it set on exit. Outside it the layers get none."""
    check_data: Callable[[Any, Any, str], None] | None = None
    """(config of a loaded adapter, the YAML config's data section, the adapter's folder): ConfigError,
    one line, when training that adapter further on this data cannot be right (multi-task LoRA:
    `dataset:` must list its tasks in the order it was trained with). Called by `tuneforge train`
    when it continues an adapter from adapter_name_or_path."""
    save_beside: Callable[[Any, str, Any, Any, str | None], None] | None = None
    """(model, adapter name, config, directory, base_model_name_or_path): called by save_adapter after
    the adapter's own files are written, for further folders in `directory` (multi-task LoRA: a plain
    peft LoRA per task in <directory>/<task>)."""
    check_run: Callable[[Any, str, Any, int], None] | None = None
    """(model, adapter name, config, total_steps): called once by the training loop when it knows the
    run's length, before anything is written to output_dir; ConfigError (one line) for settings that
    cannot work in that many steps (AdaLoRA's tinit / tfinal)."""
    use_note: Callable[[dict, str], str | None] | None = None
    """(adapter_config.json as a dict, the adapter's folder) -> a warning for loading that adapter
    as it is to answer with it (chat, api, eval, export), or None; e.g. a multi-task LoRA, whose
    task parts need task ids that only training has. tuneforge.loading logs it."""
    cannot_merge: Callable[[Any], str | None] | None = None
    """(config) -> why adapters of this method can never be merged into the weights (a nonlinearity,
    extra tokens), or None. `tuneforge export` asks it before loading anything; a layer's own
    `cannot_merge()` (layer.py) covers what depends on the layer (a quantized base)."""


_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Make `method` known to add_adapter / load_adapter / the YAML config (one call per method)."""
    if not method.layers and method.inject is None:
        raise TypeError(f"method {method.name!r} needs layer classes or an inject hook")
    _METHODS[method.name] = method
    for base_cls, layer_cls in method.layers.items():
        if base_cls is not None and layer_cls is not None:
            register_layer(base_cls, layer_cls, method.name, method.prefix or method.name.capitalize())
    return method


def method_names() -> list[str]:
    return list(_METHODS)


def all_methods() -> list[AdapterMethod]:
    return list(_METHODS.values())


def method_named(name: str) -> AdapterMethod:
    """The method whose finetuning_type is `name`; ConfigError naming the known ones otherwise."""
    got = _METHODS.get(str(name).lower())
    if got is None:
        raise ConfigError(f"unknown adapter method {name!r}; known: {', '.join(_METHODS)}")
    return got


def config_from_finetune_args(finetune: Any, model: Any, data: Any = None) -> Any:
    """The adapter config the YAML config's finetune section asks for, for `model` (the base the new
    adapter goes on): the method's `from_finetune_args` (given the data section `data` too where the
    method's `reads_data_section` says so; ConfigError when it is missing), then its `fit_to_model`."""
    method = method_named(finetune.finetuning_type)
    if method.reads_data_section:
        if data is None:
            raise ConfigError(f"finetuning_type: {method.name} needs the config's data section (dataset:)")
        cfg = method.from_finetune_args(finetune, data)
    else:
        cfg = method.from_finetune_args(finetune)
    return cfg if method.fit_to_model is None else method.fit_to_model(finetune, model, cfg)


def method_of_config(cfg: Any) -> AdapterMethod:
    """The method whose config class `cfg` is; ConfigError for anything else."""
    for m in _METHODS.values():
        if type(cfg) is m.config_class:
            return m
    for m in _METHODS.values():
        if isinstance(cfg, m.config_class):
            return m
    known = ", ".join(m.config_class.__name__ for m in _METHODS.values())
    raise ConfigError(f"add_adapter expects an adapter config ({known}), got {type(cfg).__name__}")


def method_of_peft_type(peft_type: Any) -> AdapterMethod | None:
    """The method peft calls `peft_type` ('LORA', 'IA3', ...), or None when none is registered."""
    for m in _METHODS.values():
        if str(peft_type).upper() == m.peft_type.upper():
            return m
    return None
