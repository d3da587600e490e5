"""One function per CLI command, each driven by a Config. The CLI, the web UI and Python users
all come through here, so a run is the same whichever way it was started."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import Config, save_config
from .errors import ConfigError

log = logging.getLogger("tuneforge")


def train(cfg: Config) -> dict:
    """Fine-tune as configured; returns the metrics also written to train_results.json."""
    from transformers import set_seed

    from .data import load_datasets
    from .models import bf16_is_fast, load_model_and_tokenizer
    from .train import checkpoint as ckpt
    from .train.loop import TrainingRun, mixed_precision
    from .train.methods import describe, prepare_model
    from .train.packing import choose_collator
    from .train.plot import plot_loss

    args = cfg.train
    if not args.output_dir:
        raise ConfigError("config key 'output_dir' is required for `tuneforge train`")
    if not args.do_train:
        raise ConfigError("do_train is false: nothing to do for `tuneforge train`")
    out = Path(args.output_dir)
    resume = ckpt.resolve_resume(out, args.resume_from_checkpoint, args.overwrite_output_dir)

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = mixed_precision(args, device_type, bf16_is_fast(device_type))
    if args.bf16 and precision != "bf16":
        log.warning("bf16 requested but this %s has no fast bf16; training in fp32", device_type)
    accelerator = _accelerator(precision)
    set_seed(args.seed)

    # everything that can fail on bad input happens before output_dir is touched
    load_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # LoftQ quantizes the adapted layers together with the adapter (train/methods.py)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=load_dtype,
                                                defer_quantization=bool(cfg.finetune.loftq_iter))
    splits = load_datasets(cfg.data, tokenizer, seed=args.seed)  # also sets the chat template
    model, setup = prepare_model(model, tokenizer, cfg, resume_from=resume)
    if args.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    choice = choose_collator(cfg.data, model, tokenizer.pad_token_id)  # padding or packing (probe)
    if accelerator.is_main_process:
        if choice.note:
            log.info("%s", choice.note)
        log.info("%s", describe(model))
        log.info("train examples: %d, eval examples: %d", len(splits.train),
                 len(splits.eval or []))

    if accelerator.is_main_process:
        if resume is None and args.overwrite_output_dir:
            ckpt.clear_previous_run(out)
        ckpt.remove_partial_checkpoints(out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "training_args.yaml")
        if setup.save_initial is not None:  # e.g. PiSSA's initial adapter (pissa_convert)
            setup.save_initial(model, out)
    accelerator.wait_for_everyone()

    run = TrainingRun(cfg, model, splits.train, splits.eval, choice.collate, setup, accelerator,
                      resume)
    results = run.run()
    choice.undo()  # the model's own attention and use_cache again, before it is saved
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        setup.save_final(accelerator.unwrap_model(run.model), out)
        (out / "train_results.json").write_text(json.dumps(results, indent=2))
        if args.plot_loss:
            for path in plot_loss(out):
                log.info("wrote %s", path)
        log.info("saved to %s", out)
    accelerator.end_training()
    return results


def _enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing: frozen embeddings (LoRA) then need no input-grad hook."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _accelerator(precision: str):
    """accelerate keeps one process-wide state; a second train() in the same (single-device)
    process, e.g. from a notebook, may ask for another precision, so start that state afresh."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType

    if AcceleratorState._shared_state and hasattr(AcceleratorState, "_reset_state"):
        if AcceleratorState().distributed_type == DistributedType.NO:
            AcceleratorState._reset_state()
    # cpu=True on machines without an accelerator: accelerate then sets up multi-process CPU
    # training (gloo) under torchrun / `accelerate launch`, which it does not otherwise
    return Accelerator(mixed_precision=precision, cpu=not _has_accelerator())


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return probe.is_available()
    return torch.cuda.is_available()


def chat_model(cfg: Config):
    from .infer import ChatModel

    return ChatModel(cfg)


def export(cfg: Config) -> Path:
    from .export import export_model

    return export_model(cfg)
