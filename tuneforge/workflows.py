"""One function per CLI command, each driven by a Config. The CLI, the web UI and Python users
all come through here, so a run is the same whichever way it was started."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import Config, save_config
from .errors import CheckpointError, ConfigError
from .fileio import check_output_dir, check_outside

log = logging.getLogger("tuneforge")


def _dataset_hub(function):
    """Run `function(cfg, ...)` with hub datasets read by cfg.model's hub keys (data/hf_files.py)."""
    import functools

    @functools.wraps(function)
    def run(cfg: Config, *args, **kwargs):
        from .data.hf_files import dataset_hub

        with dataset_hub(cfg.model):
            return function(cfg, *args, **kwargs)
    return run


@_dataset_hub
def train(cfg: Config) -> dict:
    """Train as configured (the `stage` from train/stages/: its data, batches, objective and
    head); returns the metrics also written to train_results.json.

    Everything that can fail on bad input (config, output_dir, checkpoints, model, data) fails
    before output_dir is touched. Raises ConfigError, DataError, ModelError, CheckpointError
    (an output_dir that is a file, the model's or an adapter's folder or inside one; a
    checkpoint that is damaged, past the run's last step or does not fit; a full or read-only
    disk, with the last checkpoint kept), TrainingDiverged (a NaN/inf loss or weight: nothing
    of it is saved), and after Ctrl-C or SIGTERM, once a checkpoint is saved,
    KeyboardInterrupt (train.stop.Interrupted) or SystemExit(143) (train.stop.Terminated)."""
    import dataclasses

    from accelerate.utils import set_seed  # transformers' one imports trainer_utils: peft, bitsandbytes

    from .config import SECRET_KEYS
    from .config_lf_keys import checkpointing_left_empty, gradient_checkpointing
    from .distributed.sharded import gathered
    from .infer.generation import check_virtual_room
    from .loading import load_for_use
    from .models import bf16_is_fast
    from .train import outputs
    from .train.heads import MODEL_CLASSES, head_targets, prepare_head
    from .train.lean_mlp import install_lean_mlp, uninstall_lean_mlp
    from .train.lean_layers import install_lean_layers, uninstall_lean_layers
    from .train.memory_plan import available_bytes, choose_checkpointing, forward_tokens
    from .train.loop import TrainingRun, mixed_precision
    from .train.methods import describe, prepare_model, refuse_unread_keys
    from .train.resume import plan_resume, prepare_output_dir
    from .train.stages import get_stage
    from .threads import apply_threads

    args = cfg.train
    if not args.output_dir:
        raise ConfigError("config key 'output_dir' is required for `tuneforge train`")
    if args.do_predict:
        _check_predict(cfg)
    if not _does_train(cfg):
        if args.do_predict:  # LLaMA-Factory's predict config: `tuneforge eval`'s predict path
            return evaluate(cfg)
        if cfg.data.tokenized_path:  # LLaMA-Factory: tokenize, save to tokenized_path and stop
            return _tokenize_only(cfg)
        raise ConfigError("do_train is false: nothing to do for `tuneforge train` (do_predict: true generates "
                          "answers for eval_dataset; with tokenized_path it tokenizes the data, saves it and stops)")
    refuse_unread_keys(cfg.finetune)
    apply_threads(args.num_threads)
    out = Path(args.output_dir)
    outputs.check_output_dir(out)
    # the model's or an adapter's folder, even with overwrite_output_dir (the export's rule)
    check_outside(out, "output_dir", _read_folders(cfg), "training", CheckpointError)
    config_values = {k: v for k, v in cfg.to_dict().items() if k not in SECRET_KEYS}
    stage = get_stage(cfg.finetune.stage)  # what is trained: records, batches, objective, head
    rounds = stage.bind(stage.round_folders, cfg)(out) if stage.round_folders else []  # semi's earlier rounds
    plan = plan_resume(out, args.resume_from_checkpoint, args.overwrite_output_dir, config_values, rounds)

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    pure_bf16 = cfg.finetune.pure_bf16  # bf16 weights and compute, no autocast (LLaMA-Factory's)
    precision = "no" if pure_bf16 else mixed_precision(args, device_type, bf16_is_fast(device_type))
    if pure_bf16 and not bf16_is_fast(device_type):
        log.info("pure_bf16: this %s has no native bf16; bf16 runs, slower than fp32 would", device_type)
    if args.bf16 and precision != "bf16" and not pure_bf16:
        log.warning("bf16 requested but this %s has no fast bf16; training in fp32", device_type)
    if args.fp16 and precision != "fp16":
        log.warning("fp16 requested but fp16 training needs a CUDA GPU and this is a %s; "
                    "training in %s", device_type, "bf16" if precision == "bf16" else "fp32")
    accelerator = _accelerator(cfg, precision)
    set_seed(args.seed)

    # everything that can fail on bad input happens before output_dir is touched
    # full / freeze keep fp32 master weights (train/methods.py): loading them in the autocast dtype
    # would round every weight, the frozen ones saved rounded and the trained ones starting rounded
    full_weights = cfg.finetune.finetuning_type in ("full", "freeze")
    load_dtype = torch.bfloat16 if pure_bf16 else torch.float32 if full_weights else \
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # the base only: prepare_model attaches the adapters; with loftq_iter, quantization waits for
    # the adapter, LoftQ quantizing the adapted layers together with it (train/methods.py)
    # the head's model class (cls: a sequence classifier, with its labels read from the data)
    options = stage.bind(stage.model_options, cfg)(cfg.data) if stage.model_options else None
    ready = load_for_use(cfg, "train", dtype=load_dtype, model_class=MODEL_CLASSES[stage.head],
                         model_options=options)
    model, tokenizer = ready.model, ready.tokenizer
    splits = stage.bind(stage.encode, cfg)(cfg.data, tokenizer, args.seed)  # sft: also sets the chat template
    # the head's modules (cls: the classifier) train in full beside the adapter (modules_to_save)
    adapter_cfg = dataclasses.replace(cfg, finetune=head_targets(stage.head, model, cfg.finetune))
    model, setup = prepare_model(model, tokenizer, adapter_cfg, resume_from=plan.checkpoint)
    model, setup = prepare_head(stage.head, model, setup)  # e.g. rm's value head, saved with it
    # an adapter's virtual tokens come before every row: the rows must still fit the context (and
    # must fit it anyway where positions are a learned table)
    # streaming: true never reads the stream whole: its rows are checked at their longest, cutoff_len
    streaming = getattr(splits.train, "streaming", False)
    rows = [{"input_ids": [0] * cfg.data.cutoff_len}] if streaming else splits.train
    check_virtual_room(model, tokenizer, {"train": rows, "eval": splits.eval},
                       cfg.data.cutoff_len, f"finetuning_type: {cfg.finetune.finetuning_type}", tunable=True,
                       whole_rows=True)
    checkpointing = gradient_checkpointing(cfg)
    # exact: gated MLPs keep 2 of their 4 tensors for backward, norms' outputs are rebuilt from their
    # inputs (train/lean_mlp.py, lean_layers.py); not under checkpointing
    lean = (install_lean_mlp(model), install_lean_layers(model)) if checkpointing is None else (0, 0)
    # the most one forward holds: a micro-batch (pairwise examples are two sequences, a prompt and two
    # replies), or one part of it where the stage splits it (Stage.part_tokens: train/parts.py)
    tokens, parts_note = forward_tokens(stage, model, args.per_device_train_batch_size,
                                        2 if stage.records == "pairwise" else 1, cfg.data.cutoff_len)
    if parts_note and accelerator.is_main_process:
        log.info("%s", parts_note)
    if checkpointing is None and checkpointing_left_empty(cfg):  # chosen by memory (train/memory_plan.py)
        note = choose_checkpointing(model, tokens, 2 if pure_bf16 or precision in ("bf16", "fp16") else 4,
                                    available_bytes(device_type), lean_mlp=lean[0] > 0, lean_norms=lean[1] > 0)
        if note is not None:
            log.info("%s", note)
            checkpointing = gradient_checkpointing(cfg, chosen=True)
    if checkpointing is not None:
        uninstall_lean_mlp(model), uninstall_lean_layers(model)
        _enable_activation_checkpointing(model, checkpointing)
    elif any(lean) and accelerator.is_main_process:
        log.info("activations: %d gated MLPs keep their gate and up outputs only, %d layers rebuild their "
                 "norm outputs (and packed attention's) in backward (same gradients, less memory)", *lean)
    choice = stage.collator_for(cfg)(cfg.data, model, tokenizer)  # sft: padding or packing (probe)
    if accelerator.is_main_process:
        if choice.note:
            log.info("%s", choice.note)
        log.info("%s", describe(model))
        log.info("train examples: %s, eval examples: %d", "streamed" if streaming else len(splits.train),
                 len(splits.eval or []))
    if plan.warning() and accelerator.is_main_process:
        log.warning("%s", plan.warning())

    def first_write() -> None:  # after every check that can refuse the run
        if accelerator.is_main_process:
            prepare_output_dir(out, plan, lambda path: save_config(cfg, path))
            if setup.save_initial is not None:  # e.g. PiSSA's initial adapter (pissa_convert)
                with outputs.disk_errors(out, "the initial adapter", errno_only=False):
                    setup.save_initial(model, out)
        accelerator.wait_for_everyone()

    if stage.train is None:
        run = TrainingRun(cfg, model, splits.train, splits.eval, choice.collate, setup, accelerator,
                          stage.objective_for(cfg, tokenizer), stage.eval_metrics)
        if plan.checkpoint is not None:
            run.restore(plan.checkpoint)  # refuses a changed batch size, dataset, ...
        first_write()
        with outputs.disk_errors(out, "the training log"):
            results = run.run()
    else:  # a stage that trains in rounds (semi): the same loop, run again on other examples; a round
        # resumes from its checkpoint (plan.checkpoint) and the first write waits for that check
        with outputs.disk_errors(out, "the training log"):
            run, results = stage.bind(stage.train, cfg, resume_from=plan.checkpoint)(
                _runs_of(cfg, model, splits, choice.collate, setup, accelerator, stage, first_write), model,
                splits, tokenizer, cfg)
    choice.undo()  # the model's own attention and use_cache again, before it is saved
    run.check_weights()
    accelerator.wait_for_everyone()
    with gathered(run.model):  # FSDP2: every process gathers its shards; the main one saves them whole
        if accelerator.is_main_process:
            _save_outputs(run, setup, out, results, stage.plot if args.plot_loss else None)
    accelerator.end_training()
    if args.do_predict and accelerator.is_main_process:  # the trained model, loaded as `tuneforge eval` would
        results = {**results, **evaluate(_trained_config(cfg, out))}
    return results


def _tokenize_only(cfg: Config) -> dict:
    """do_train: false with tokenized_path: the stage's examples, tokenized as training would and
    saved (data/tokenized.py); nothing is trained and output_dir is not touched."""
    from .loading import load_for_use
    from .train.stages import get_stage

    tokenizer = load_for_use(cfg, "train").tokenizer  # the tokenizer exactly as training sets it up
    splits = get_stage(cfg.finetune.stage).encode(cfg.data, tokenizer, cfg.train.seed)
    log.info("do_train is false: the tokenized data is in %s (%d train, %d eval examples); nothing trained. "
             "Train with tokenized_path: %s", cfg.data.tokenized_path, len(splits.train), len(splits.eval or []),
             cfg.data.tokenized_path)
    return {"train_examples": len(splits.train), "eval_examples": len(splits.eval or [])}


def _does_train(cfg: Config) -> bool:
    """do_train, whose empty value is true unless do_predict is true and no dataset is set."""
    if cfg.train.do_train is not None:
        return cfg.train.do_train
    return not (cfg.train.do_predict and not cfg.data.dataset)


def _check_predict(cfg: Config) -> None:
    """do_predict in `tuneforge train` generates answers for supervised eval data: checked
    before anything loads or trains."""
    if cfg.finetune.stage != "sft":
        raise ConfigError(f"config key 'do_predict' generates answers for stage: sft data (got stage: "
                          f"{cfg.finetune.stage}); drop do_predict")
    if not cfg.data.eval_dataset and not cfg.data.val_size:
        raise ConfigError("config key 'do_predict' needs eval data: set eval_dataset: <names>, or val_size: "
                          "<fraction or count> with dataset: <names>")


def _trained_config(cfg: Config, out: Path) -> Config:
    """`cfg` with the model just trained in `out`: its adapter in place of the one trained further
    (after the merged ones; with create_new_adapter after all the listed ones), or, for full /
    freeze fine-tuning, the model folder itself."""
    import dataclasses

    from .models import split_paths

    model = cfg.model
    if (out / "adapter_config.json").is_file():
        paths = split_paths(model.adapter_name_or_path)
        kept = paths if cfg.finetune.create_new_adapter else paths[:-1]
        model = dataclasses.replace(model, adapter_name_or_path=",".join([*kept, str(out)]))
    else:
        model = dataclasses.replace(model, model_name_or_path=str(out), adapter_name_or_path=None)
    return dataclasses.replace(cfg, model=model)
def _runs_of(cfg: Config, model, splits, collate, setup, accelerator, stage, first_write):
    """`run_once(train_examples, output_dir, resume_from=None) -> (run, results)` for a stage's `train`
    (Stage.train): one run of the one loop (train.loop.TrainingRun) on the same model, continuing its
    weights or restoring checkpoint `resume_from`, with other train examples and its log and
    checkpoints in `output_dir`. `first_write()` runs once, before the first run writes anything
    (after its checkpoint is checked); a run that starts from its first step clears what an earlier
    attempt left in its folder (train/resume.start_afresh)."""
    import dataclasses

    from .train.loop import TrainingRun
    from .train.resume import start_afresh

    pending = [first_write]

    def run_once(train_examples: list[dict], output_dir: str | Path, resume_from: Path | None = None):
        round_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(output_dir)))
        run = TrainingRun(round_cfg, model, train_examples, splits.eval, collate, setup, accelerator,
                          stage.objective_for(cfg), stage.eval_metrics)
        if resume_from is not None:
            run.restore(resume_from)  # refuses a changed batch size, dataset, ...
        while pending:
            pending.pop()()
        if resume_from is None and accelerator.is_main_process:
            start_afresh(Path(output_dir))
        accelerator.wait_for_everyone()
        return run, run.run()

    return run_once


def _read_folders(cfg: Config) -> list[tuple[str, Path]]:
    """The folders training reads, by config key: the model's (the default model's place in
    the cache, not converted here; a .gguf file has no folder of its own) and each adapter's."""
    from .models import DEFAULT_MODEL_NAME, cache_root, split_paths

    name = cfg.model.model_name_or_path
    model = Path(name).expanduser() if name else \
        cache_root(cfg.model.cache_dir) / "models" / DEFAULT_MODEL_NAME
    found = [] if model.is_file() else [("model_name_or_path", model)]
    found += [("adapter_name_or_path", Path(p)) for p in split_paths(cfg.model.adapter_name_or_path)]
    return found


def _save_outputs(run, setup, out: Path, results: dict, plot: tuple[str, ...] | None) -> None:
    """The final model, metrics and loss plot (with the stage's `plot` metrics; None: no plot),
    staged in a temporary folder and moved into output_dir, so that a kill or a full disk leaves
    no half-written adapter there."""
    from .train import outputs
    from .train.plot import plot_loss

    stage = out / f"{outputs.TMP_PREFIX}final"
    outputs.discard(stage)
    try:
        stage.mkdir()
        setup.save_final(run.acc.unwrap_model(run.model), stage)
        (stage / "train_results.json").write_text(json.dumps(results, indent=2))
        outputs.fsync_tree(stage)
    except BaseException as exc:
        fault = outputs.disk_fault(exc, out) if isinstance(exc, Exception) else None
        outputs.discard(stage)
        if fault is not None:
            raise outputs.disk_error(fault, out, "the final model") from None
        raise
    outputs.publish(stage, out)
    if plot is not None:
        with outputs.disk_errors(out, "the loss plot"):
            for path in plot_loss(out, plot):
                log.info("wrote %s", path)
    log.info("saved to %s", out)


def _enable_activation_checkpointing(model, kwargs: dict | None = None) -> None:
    """Gradient checkpointing with torch's checkpoint called with `kwargs` (config_lf_keys.
    gradient_checkpointing; default reentrant, as LLaMA-Factory). transformers makes the input
    embeddings' output require grad, so that frozen embeddings (LoRA) pass gradients through."""
    kwargs = {"use_reentrant": True} if kwargs is None else kwargs
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _accelerator(cfg: Config, precision: str):
    """The run's Accelerator with the config's distributed settings (distributed/plugins.py).
    cpu=True on machines without an accelerator: accelerate then sets up multi-process CPU
    training (gloo) under torchrun / `accelerate launch`, which it does not otherwise."""
    from .distributed.plugins import make_accelerator

    return make_accelerator(cfg, precision, cpu=not _has_accelerator())


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return probe.is_available()
    return torch.cuda.is_available()


@_dataset_hub
def evaluate(cfg: Config, limit: int | None = None, progress: bool = True) -> dict:
    """Eval loss and perplexity on the eval split (eval_dataset, or the val_size hold-out of
    dataset, split as `train` splits it); with do_predict also generated answers scored with
    ROUGE/BLEU. `limit` keeps the first examples only. Results go to output_dir when set.

    Raises ConfigError (a stage other than sft, no eval data, a bad limit, an output_dir that cannot
    be a folder: checked before the model loads; an example or prompt that does not fit the model's
    context with the adapter's virtual tokens: checked before the work), DataError, ModelError."""
    import dataclasses

    from .data import load_datasets
    from .errors import DataError
    from .eval.predict import run_predict
    from .infer import ChatModel
    from .train.stages import get_stage

    stage = cfg.finetune.stage
    if get_stage(stage).evaluate is not None:  # e.g. cls: accuracy of the classifier
        return get_stage(stage).bind(get_stage(stage).evaluate, cfg)(cfg, limit)
    if stage != "sft":
        raise ConfigError(f"`tuneforge eval` scores supervised (stage: sft) data; a stage: {stage} run is "
                          "evaluated by `tuneforge train` itself on its held-out split (set val_size or "
                          "eval_dataset there), or set stage: sft to score chat data with this model")
    data = cfg.data
    if not data.eval_dataset and not data.val_size:
        raise ConfigError("`tuneforge eval` needs eval data: set eval_dataset: <names> "
                          "or dataset: <names> with val_size: <fraction or count>")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--max_samples must be positive; got {limit}")
    if cfg.train.output_dir:  # before the model loads and the work is done
        check_output_dir(cfg.train.output_dir, "output_dir")
    chat = ChatModel(cfg)  # model + adapters + template, as chat uses them
    # the reference is the last reply; the loss is taken on that reply only
    data = dataclasses.replace(data, dataset=data.dataset or data.eval_dataset,
                               train_on_prompt=False, mask_history=True)
    examples = load_datasets(data, chat.tokenizer, seed=cfg.train.seed).eval or []
    examples = examples[:limit] if limit else examples
    if not examples:
        raise DataError("the eval split is empty: raise val_size or check eval_dataset")
    log.info("evaluating %d examples", len(examples))
    return run_predict(chat.model, chat.tokenizer, examples, cfg.generate,
                       cfg.train.per_device_eval_batch_size, cfg.train.output_dir,
                       do_predict=cfg.train.do_predict,
                       progress=progress and not cfg.train.disable_tqdm,
                       cutoff_len=data.cutoff_len, adapter=chat.virtual_tokens()[1])


def evaluate_benchmark(cfg: Config, files: list[str] | None = None, n_shot: int | None = None,
                       dev: str | list[str] | None = None, limit: int | None = None,
                       progress: bool = True) -> dict:
    """Multiple-choice accuracy per subject (eval/choice.py) on local MMLU/C-Eval style files or
    folders, or, without files, on the config's `task` in `task_dir` (eval/tasks.py), with
    per-category accuracy where the task has a mapping.json. `dev`: files or folders the n-shot
    examples come from (a task's dev split by default). n_shot None: the config's n_shot.
    Written to <save_dir or output_dir>/benchmark_results.json when either is set.

    Raises ConfigError (nothing to evaluate, a bad n_shot, a save_dir / output_dir that cannot be
    a folder: checked before the model loads), DataError, ModelError."""
    from .eval.choice import evaluate_choices, read_benchmark
    from .eval.tasks import category_accuracy, resolve_task
    from .infer import ChatModel
    from .models import cache_root

    ev = cfg.evaluation
    n_shot = ev.n_shot if n_shot is None else n_shot
    if n_shot < 0:
        raise ConfigError(f"--n_shot must be >= 0; got {n_shot}")
    out_dir = ev.save_dir or cfg.train.output_dir
    if out_dir:  # before the model loads and the benchmark runs
        check_output_dir(out_dir, "save_dir" if ev.save_dir else "output_dir")
    task = None
    if not files:
        if not ev.task:
            raise ConfigError("nothing to evaluate: set task (e.g. mmlu_test) or pass --benchmark FILE")
        task = resolve_task(ev.task, ev.task_dir, cache_root(cfg.model.cache_dir) / "eval")
        files = [str(task.questions)]
        dev = dev or ([str(task.shots)] if task.shots else None)
    rows = read_benchmark(files)
    rows = rows[:limit] if limit else rows
    dev_rows = read_benchmark([dev] if isinstance(dev, str) else dev) if dev else None
    mapping = task.mapping if task else {}
    names = {s: v["name"] for s, v in mapping.items() if ev.lang == "zh" and v.get("name")}
    chat = ChatModel(cfg)
    result = evaluate_choices(chat.model, chat.tokenizer, rows, n_shot, dev_rows, ev.batch_size,
                              progress and not cfg.train.disable_tqdm, ev.lang, names,
                              adapter=chat.virtual_tokens()[1])
    accuracy = result["accuracy"]
    if mapping:
        accuracy = {**accuracy, **category_accuracy(rows, result["choices"], mapping)}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark_results.json").write_text(json.dumps(accuracy, indent=2, ensure_ascii=False))
    return accuracy


def chat_model(cfg: Config):
    from .infer import ChatModel

    return ChatModel(cfg)


def api(cfg: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve the base model and every adapter in adapter_name_or_path over an OpenAI-compatible
    HTTP API (blocking). Address, port and bearer key: the arguments, then the api_* config
    keys, then API_HOST / API_PORT / API_KEY in the environment, then 127.0.0.1:8000, no key."""
    from .api.server import resolve_address, resolve_api_key, serve
    from .infer.engine import Engine

    host, port = resolve_address(cfg.serve, host, port)
    api_key = resolve_api_key(cfg.serve)
    engine = Engine.from_config(cfg)
    serve(engine, host=host, port=port, api_key=api_key)


def export(cfg: Config) -> Path:
    from .export import export_model

    return export_model(cfg)
