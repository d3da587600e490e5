"""Fine-tuning types (lora / freeze / full): which parameters train, and how the result is
saved. The training loop only sees `requires_grad` and calls `save_final(model, dir)`."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import adapters
from ..adapters import inits
from ..adapters.convert import save_initial_adapter
from ..adapters.loftq import finish_pending, take_pending
from ..distributed.sharded import is_sharded, plain_state_dict
from ..errors import CheckpointError, ConfigError
from ..models import attach_adapters, split_paths
from ..quant import QuantLinear
from ..quant.provenance import record_base
from ..vocab import RESIZED, embedding_names

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# in each checkpoint of a PiSSA run: the adapter's initial (A0, B0), so a resume rebuilds the
# residual base exactly (the randomised SVD of pissa_iter could not be redone)
INITIAL_STATE = "adapter_initial_state.safetensors"
log = logging.getLogger("tuneforge")


def refuse_unread_keys(finetune) -> None:
    """A finetune-section key that some adapter method reads (its `AdapterMethod.keys`), set to other
    than its default in a config whose finetuning_type does not read it (lora_rank with ia3), would
    be silently ignored: ConfigError naming the key and the methods that read it. freeze / full
    configs are left alone (LLaMA-Factory's often carry LoRA keys)."""
    from ..config_checks import method_key_problems
    from ..errors import config_error

    lines = [line for line in method_key_problems(finetune, given=()) if line.endswith("; remove it")]
    if lines:  # config validation reports them with the config's other blockers; a Config made in Python too
        raise config_error(lines)


@dataclass
class TrainableSetup:
    kind: str
    save_final: Callable  # (model, directory) -> None: the artefact users load afterwards
    save_in_checkpoint: Callable | None  # extra user-facing files inside each checkpoint
    save_initial: Callable | None = None  # (model, output_dir) -> None, once before training


def _decoder_layers(model) -> torch.nn.ModuleList:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ConfigError("finetuning_type: freeze could not find the model's decoder layers; "
                      "use finetuning_type: lora or full")


def _freeze(model, finetune) -> None:
    layers = _decoder_layers(model)
    n = finetune.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise ConfigError(f"config key 'freeze_trainable_layers' must be between 1 and "
                          f"{len(layers)} (or -1 and -{len(layers)}) for this model; got {n}")
    if getattr(finetune, "use_llama_pro", False):  # LLaMA Pro: the expanded blocks (tuneforge/llama_pro.py)
        from ..llama_pro import expanded_blocks
        chosen = expanded_blocks(list(layers), n)
    else:
        chosen = list(layers)[-n:] if n > 0 else list(layers)[:-n]
    modules = split_paths(finetune.freeze_trainable_modules)
    model.requires_grad_(False)
    matched = False
    for layer in chosen:
        for name, param in layer.named_parameters():
            if modules == ["all"] or any(f".{m}." in f".{name}" or name.startswith(m + ".")
                                         for m in modules):
                param.requires_grad_(True)
                matched = True
    if not matched:
        raise ConfigError(f"config key 'freeze_trainable_modules' ({finetune.freeze_trainable_modules})"
                          " matches no parameter in the trainable layers")


def prepare_model(model, tokenizer, cfg, resume_from: Path | None = None
                  ) -> tuple[torch.nn.Module, TrainableSetup]:
    """Make the right parameters trainable; `resume_from` (a checkpoint) lets a PiSSA adapter
    rebuild the residual base of the run it continues."""
    finetune, model_args = cfg.finetune, cfg.model
    base_id = model_args.model_name_or_path or DEFAULT_HUB_ID

    def save_model_dir(m, directory):
        # FSDP2 (inside distributed.sharded.gathered): the whole weights, not state_dict()'s shards
        m.save_pretrained(directory, state_dict=plain_state_dict(m) if is_sharded(m) else None)
        tokenizer.save_pretrained(directory)

    if finetune.finetuning_type in adapters.method_names():  # lora, ia3, ...: the method's adapter
        paths = split_paths(model_args.adapter_name_or_path)
        if paths and not finetune.create_new_adapter:
            model = attach_adapters(model, paths, trainable=True)
            trained = adapters.list_adapters(model)["default"]
            method = adapters.methods.method_of_config(trained)
            wanted = adapters.methods.method_named(finetune.finetuning_type)
            if method.config_class is not wanted.config_class:  # e.g. a plain LoRA under lora_dynamic
                raise ConfigError(
                    f"adapter_name_or_path '{paths[-1]}' holds a {method.label or method.name} adapter (peft_type "
                    f"{method.peft_type}), which trains on as finetuning_type: {method.name}, not "
                    f"{finetune.finetuning_type}: set finetuning_type: {method.name} to continue it, or "
                    f"create_new_adapter: true to merge it and train a new {finetune.finetuning_type} adapter")
            if method.check_data is not None:  # e.g. multi-task LoRA: dataset: must list its tasks
                method.check_data(trained, cfg.data, paths[-1])
        else:
            pending = take_pending(model)  # deferred (LoftQ): the base is quantized with the new adapter
            if paths:  # create_new_adapter: merge every listed adapter, then train a fresh one
                model = adapters.unload(attach_adapters(model, paths, trainable=False), merge=True)
            train_new_vocab(model, finetune)  # resized vocabulary: embeddings trained in full
            config = adapters.methods.config_from_finetune_args(finetune, model, cfg.data)
            if getattr(finetune, "use_llama_pro", False):  # LLaMA Pro: LoRA on the expanded blocks only
                from ..llama_pro import expanded_targets
                config.target_modules = expanded_targets(model, config.target_modules, finetune.freeze_trainable_layers)
            _add_new_adapter(model, config, resume_from)
            if pending is not None:  # deterministic: a resumed run rebuilds the same base
                finish_pending(model, pending, "default", finetune.loftq_iter)
        train_dtype = torch.bfloat16 if finetune.pure_bf16 else torch.float32
        for p in model.parameters():  # adapters train in fp32 even on a bf16 base (pure_bf16: in bf16)
            if p.requires_grad and p.is_floating_point() and p.dtype != train_dtype:
                p.data = p.data.to(train_dtype)
        return model, _lora_setup(model, tokenizer, finetune, base_id)

    if model_args.adapter_name_or_path:
        raise ConfigError("config key 'adapter_name_or_path' needs finetuning_type: lora "
                          "(export a merged model first to train it in full or freeze mode)")
    if finetune.finetuning_type == "freeze":
        _freeze(model, finetune)
    else:
        model.requires_grad_(True)
    if not finetune.pure_bf16:  # pure_bf16: the weights stay bf16, with no fp32 master copy
        model.float()  # full/freeze keep fp32 master weights; autocast gives bf16 compute on GPUs
    return model, TrainableSetup(finetune.finetuning_type, save_model_dir, None)


def _add_new_adapter(model, config, resume_from: Path | None) -> None:
    """add_adapter; a PiSSA/OLoRA adapter resuming a run takes the run's initial (A0, B0)."""
    state = None
    init = getattr(config, "init_lora_weights", True)  # LoRA's option; other methods have none
    if inits.is_weight_init(init) and resume_from is not None:
        from safetensors.torch import load_file

        path = Path(resume_from) / INITIAL_STATE
        if path.is_file():
            state = load_file(str(path))
        elif inits.pissa_niter(init) is not None:
            raise CheckpointError(
                f"checkpoint '{resume_from}' has no {INITIAL_STATE}: the randomised SVD of that run's "
                "PiSSA init (pissa_iter) cannot be redone, so its residual weights are lost; start "
                "over (overwrite_output_dir: true)")
    context = inits.given_initial_state(model, "default", state) if state else nullcontext()
    with context:
        adapters.add_adapter(model, config, name="default")


def _lora_setup(model, tokenizer, finetune, base_id: str) -> TrainableSetup:
    """How a LoRA run saves. With pissa_convert (LLaMA-Factory's layout): output_dir/pissa_init
    at the start; at the end output_dir/pissa_backup (the raw PiSSA adapter, for the residual
    base), output_dir/pissa_converted, and output_dir itself holding the converted adapter (a plain
    LoRA for the original model), as do the checkpoints."""
    init = getattr(adapters.list_adapters(model)["default"], "init_lora_weights", True)
    weight_init, convert = inits.is_weight_init(init), finetune.pissa_convert
    if inits.pissa_niter(init) is not None and not convert:
        log.warning("pissa_iter: %d without pissa_convert: the adapter in output_dir fits only the "
                    "residual weights of this run (tuneforge will refuse to load it); set "
                    "pissa_convert: true, or pissa_iter: -1", finetune.pissa_iter)

    def save(m, directory, converted=convert):

        adapters.save_adapter(m, directory, name="default", base_model_name_or_path=base_id,
                              convert_pissa=converted)
        record_base(m, directory)  # QLoRA: which quantized base the adapter was trained on

    def save_final(m, directory):
        if convert:
            save(m, Path(directory) / "pissa_backup", converted=False)
            save(m, Path(directory) / "pissa_converted")
        save(m, directory)
        tokenizer.save_pretrained(directory)

    def save_in_checkpoint(m, directory):
        save(m, directory)
        tokenizer.save_pretrained(directory)
        if weight_init:
            from safetensors.torch import save_file

            state = inits.initial_state(m, "default")
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(Path(directory) / INITIAL_STATE))

    def save_initial(m, directory):
        save_initial_adapter(m, Path(directory) / "pissa_init", "default", base_id)

    return TrainableSetup(finetune.finetuning_type, save_final, save_in_checkpoint, save_initial if convert else None)


def describe(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # quantized weights are buffers, but they are parameters of the model too
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    total += quantized
    text = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    return text + (f" || quantized: {quantized:,}" if quantized else "")


def train_new_vocab(model, finetune) -> None:
    """LLaMA-Factory's rule: a model whose vocabulary was resized (vocab.py) trains its input
    embedding and output head in full beside the adapter (additional_target), unless
    additional_target names modules itself."""
    resized = getattr(model, RESIZED, None)
    if resized is None:
        return
    if finetune.additional_target:
        log.warning("the vocabulary was resized (%d -> %d rows) but additional_target (%s) is set, so the new "
                    "tokens' embeddings train only if it names the embeddings", *resized, finetune.additional_target)
        return
    finetune.additional_target = ",".join(embedding_names(model))
    log.info("the vocabulary was resized (%d -> %d rows): %s train in full with the adapter (additional_target)",
             *resized, finetune.additional_target)
