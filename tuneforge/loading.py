"""One road to a model ready for use: `tuneforge chat`, `eval`, `api`, `export` and `train` all
get their model here, so a base model, its adapters, its quantization (LoftQ's included) and its
dtype come out the same whichever command asks.

    ready = load_for_use(cfg, "chat")          # ready.model, ready.tokenizer, ready.served

What differs between commands is one row of PURPOSES:
- how `adapter_name_or_path: a,b,c` is attached: "stack" (LLaMA-Factory's rule, chat / eval /
  export: all but the last merged into the base, the last one kept as an adapter), "beside" (the
  API: each loaded under its own name, none merged, requests choose one) or "none" (training:
  train/methods.prepare_model attaches them, trainable or not, with the new adapter);
- the dtype: infer_dtype, or float32 for an export (merged exactly before the final cast), or the
  one training computes in (passed by the caller);
- whether the chat template is set here (training sets it while reading its datasets) and
  whether the model is put in eval mode with its KV cache on.

With `loftq_iter` and adapters (or training), quantization waits for the adapter: a LoftQ adapter
rebuilds the quantized base it was trained on from the full-precision weights
(adapters/loftq.load_adapter_for_base); a LoftQ adapter fits only that base, so the API serves it
alone and chat never merges it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import models
from .adapters.peft_format import check_adapter_dir
from .data import apply_template
from .errors import ConfigError, ModelError
from .adapters.loftq import load_adapter_for_base, loftq_record
from .quant.provenance import check_base
from .train.heads import VALUE_HEAD_FILE
from .vocab import adapter_tokenizer

log = logging.getLogger("tuneforge")


@dataclass(frozen=True)
class Purpose:
    adapters: str  # "stack", "beside" or "none" (see the module's docstring)
    dtype: torch.dtype | None  # None: model.infer_dtype, unless the caller passes one
    template: bool  # set the chat template (data.apply_template)
    generate: bool  # eval mode, KV cache on


PURPOSES = {
    "chat": Purpose("stack", None, True, True),  # eval too (through infer.ChatModel)
    "serve": Purpose("beside", None, True, True),
    "export": Purpose("stack", torch.float32, True, False),
    "train": Purpose("none", None, False, False),
    "classify": Purpose("stack", None, False, False),  # eval of a classifier (stage: cls), no template
    "score": Purpose("stack", None, True, True),  # a reward model with its value head (train/reward.py)
}
# peft task types a purpose can use: the text-generating purposes need a language model's adapter
GENERATES = ("chat", "serve", "export")


@dataclass
class ReadyModel:
    model: torch.nn.Module
    tokenizer: object
    # "beside" (the API): public model id (the adapter's folder name) -> adapter name in `model`
    served: dict[str, str] = field(default_factory=dict)


def load_for_use(cfg, purpose: str, dtype: torch.dtype | str | None = None,
                 before_adapters: Callable | None = None, model_class: str = "AutoModelForCausalLM",
                 model_options: dict | None = None) -> ReadyModel:
    """The model, tokenizer and adapters `cfg` describes, ready for `purpose` (a key of PURPOSES).

    dtype overrides the purpose's. model_class / model_options: the transformers Auto class and
    its from_pretrained options (a stage's head: train.heads.MODEL_CLASSES, Stage.model_options). before_adapters(model, tokenizer) -> model runs on the loaded
    (and, unless deferred for LoftQ, quantized) base before any adapter is attached: the export's
    checks of its format and disk space, and its move to the merge device.

    Every adapter path is checked (it exists, is a folder, holds adapter_config.json) before the
    model loads. Raises ModelError (one line naming the file) for a model or an adapter that
    cannot be loaded, ConfigError for adapters that cannot be attached as configured (two served
    under one folder name, a LoftQ adapter merged or served beside others or without its
    quantization_bit / loftq_iter), what data.apply_template raises for the chat template, and
    ValueError for an unknown purpose."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    use = PURPOSES[purpose]
    paths = models.split_paths(cfg.model.adapter_name_or_path)
    names = _served_names(paths) if use.adapters == "beside" else []
    if use.adapters != "none":
        for path in paths:  # every path before the model loads
            check_adapter_dir(path)
            _warn_use_note(path)
            if purpose in GENERATES or purpose == "score":
                _refuse_classifier(path, purpose)
            if purpose != "score" and (Path(path) / VALUE_HEAD_FILE).is_file():
                log.warning("adapter '%s' is a reward model's (stage: rm): %s uses its adapter and ignores its "
                            "value head (%s); to score texts use tuneforge.train.reward.load_reward_model",
                            path, purpose, VALUE_HEAD_FILE)
    if use.adapters == "beside":
        _refuse_shared_loftq(paths)
    loftq = bool(cfg.finetune.loftq_iter) and (bool(paths) or use.adapters == "none")
    model, tokenizer = models.load_model_and_tokenizer(  # a module attribute: tests stub it
        cfg.model, dtype=dtype if dtype is not None else use.dtype, defer_quantization=loftq,
        **({"model_class": model_class, "model_options": model_options}
           if model_class != "AutoModelForCausalLM" else {}))
    tokenizer = adapter_tokenizer(model, tokenizer, paths)  # an adapter trained on added tokens
    if use.template:
        apply_template(tokenizer, cfg.data.template, cfg.data.enable_thinking)
    if before_adapters is not None:
        model = before_adapters(model, tokenizer)
    served = {}
    if paths and use.adapters == "stack":
        model = models.attach_adapters(model, paths, trainable=False)
    elif paths and use.adapters == "beside":
        served = _load_beside(model, paths, names)
    if use.generate:
        model.config.use_cache = True
        model.eval()
    return ReadyModel(model, tokenizer, served)


def _refuse_classifier(path: str, purpose: str) -> None:
    """ConfigError for a sequence classifier's adapter (peft task_type SEQ_CLS, stage: cls) where
    text is generated: it has a classifier head, not a language-model head."""
    try:
        raw = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading it says what is wrong, in its own line
    if isinstance(raw, dict) and raw.get("task_type") == "SEQ_CLS":
        raise ConfigError(f"adapter '{path}' is a sequence classifier's (task_type SEQ_CLS, stage: cls), which "
                          f"cannot {'be exported' if purpose == 'export' else 'generate text'}; score it with "
                          "`tuneforge eval` (stage: cls, eval_dataset or val_size), which prints its accuracy")


def _warn_use_note(path: str) -> None:
    """The adapter's method's `use_note` (AdapterMethod), as one warning line."""
    from .adapters.methods import method_of_peft_type

    try:
        raw = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading it says what is wrong, in its own line
    method = method_of_peft_type(raw.get("peft_type")) if isinstance(raw, dict) else None
    note = method.use_note(raw, path) if method is not None and method.use_note is not None else None
    if note:
        log.warning("%s", note)


def _served_names(paths: list[str]) -> list[str]:
    """The API's model ids: the adapters' folder names, each once. ModelError for a path that is
    a file or missing, ConfigError for two folders of one name."""
    for path in paths:
        if Path(path).is_file():
            raise ModelError(f"adapter path '{path}' is a file; give the adapter's folder "
                             "(the one holding adapter_config.json)")
        if not Path(path).is_dir():
            raise ModelError(f"adapter path '{path}' does not exist")
    names = [Path(p).name for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"adapter_name_or_path: several adapter folders are named {dupes}; "
                          "the served model ids are folder names, so rename them")
    return names


def _refuse_shared_loftq(paths: list[str]) -> None:
    """A LoftQ adapter runs on the quantized base rebuilt for it, which differs from the plain
    quantized base (and from another LoftQ adapter's): it is served alone (ConfigError)."""
    loftq = [p for p in paths if loftq_record(p)]
    if loftq and len(paths) > 1:
        raise ConfigError(f"adapter '{loftq[0]}' was trained on a LoftQ base built for it alone, "
                          "which the base model and the other adapters cannot share; serve it by "
                          "itself (adapter_name_or_path: that folder only)")


def _load_beside(model, paths: list[str], names: list[str]) -> dict[str, str]:
    """Load every adapter under its own name, none merged; public model id -> adapter name."""
    for path in paths:
        check_base(model, path)  # says so when the adapter was trained on another base
    served = {}
    for i, (name, path) in enumerate(zip(names, paths)):
        served[name] = f"serve_{i}"  # folder names may hold characters adapter names may not
        # with deferred quantization (loftq_iter) the first adapter settles the base: rebuilt by
        # LoftQ for a LoftQ adapter (then the only one), else quantized plainly
        try:
            load_adapter_for_base(model, path, name=served[name], trainable=False)
        except ModelError as e:  # name the adapters already loaded by their folders, not their inner names
            message = str(e)
            for j in range(i):
                message = message.replace(repr(f"serve_{j}"), repr(str(paths[j])))
            raise ModelError(message) from None
    return served
