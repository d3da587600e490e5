"""The head a stage needs on top of the model the loader returns (Stage.head, a key of
stages.table.HEADS): `prepare_head` puts it on the model before training and makes the run's
saves write it too.

- causal_lm: the model's own head; nothing to do.
- value: LLaMA-Factory's (trl's) value head, `v_head.summary`, a Linear(hidden size -> 1) on the
  model's final hidden states, read at each row's last real token. It trains with the adapter
  (or the weights) and is saved beside them as value_head.safetensors with LLaMA-Factory's keys
  v_head.summary.weight / v_head.summary.bias, in every checkpoint and at the end.
- classifier: the model is loaded as transformers' AutoModelForSequenceClassification (MODEL_CLASSES)
  with the stage's num_labels and label names; its head modules (those outside the base model, such
  as BERT's `classifier` or a decoder's `score`, and modules the checkpoint lacks entirely, such as a
  sentence-transformers BERT's pooler) train in full: an adapter saves them as peft
  modules_to_save (`head_targets`), freeze fine-tuning unfreezes them. The label names are also
  written as labels.json (id2label, label2id) beside the adapter or model."""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..weightfiles import load_safetensors
from .fused_loss import head_as_identity

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")


class ValueHead(torch.nn.Module):
    """hidden states (..., hidden) -> one value each (..., 1), in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype))


def _hidden_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "in_features"):
        return head.in_features
    return model.config.hidden_size


def add_value_head(model) -> ValueHead:
    """A new fp32 value head on `model` (as `model.v_head`, so its parameters are named
    v_head.summary.*), on the device of the model's embeddings, trainable."""
    device = model.get_input_embeddings().weight.device
    model.v_head = ValueHead(_hidden_size(model)).to(device=device, dtype=torch.float32)
    model.v_head.requires_grad_(True)
    return model.v_head


@contextmanager
def _without_value_head(model):
    """Within the block the model has no v_head, so that saving its weights (full fine-tuning)
    writes the model alone, as LLaMA-Factory does."""
    head = model._modules.pop("v_head", None)
    try:
        yield
    finally:
        if head is not None:
            model.v_head = head


def save_value_head(model, directory: str | Path) -> Path:
    """Write model.v_head to directory/value_head.safetensors (LLaMA-Factory's keys)."""
    from safetensors.torch import save_file

    summary = model.v_head.summary
    path = Path(directory) / VALUE_HEAD_FILE
    save_file({VALUE_HEAD_KEYS[0]: summary.weight.detach().float().cpu().contiguous(),
               VALUE_HEAD_KEYS[1]: summary.bias.detach().float().cpu().contiguous()},
              str(path), metadata={"format": "pt"})
    return path


def load_value_head(model, directory: str | Path) -> ValueHead:
    """Put the value head saved in `directory` (value_head.safetensors, as tuneforge and
    LLaMA-Factory write it) on `model`.

    Raises CheckpointError (one line naming the file) when it is missing, damaged, lacks a key
    or was made for another hidden size."""
    path = Path(directory) / VALUE_HEAD_FILE
    if not path.is_file():
        raise CheckpointError(f"'{directory}' has no {VALUE_HEAD_FILE}: it is not a reward model "
                              "(train one with stage: rm)")
    tensors = load_safetensors(path, "value head file", CheckpointError)
    missing = [key for key in VALUE_HEAD_KEYS if key not in tensors]
    if missing:
        raise CheckpointError(f"value head file '{path}' lacks {', '.join(missing)}; it holds "
                              f"{', '.join(sorted(tensors)) or 'nothing'}")
    hidden = _hidden_size(model)
    weight, bias = tensors[VALUE_HEAD_KEYS[0]], tensors[VALUE_HEAD_KEYS[1]]
    if tuple(weight.shape) != (1, hidden) or tuple(bias.shape) != (1,):
        raise CheckpointError(f"value head file '{path}' holds a head of shape {tuple(weight.shape)} "
                              f"for another model: this model's hidden size is {hidden}")
    head = add_value_head(model)
    with torch.no_grad():
        head.summary.weight.copy_(weight)
        head.summary.bias.copy_(bias)
    head.requires_grad_(False)
    return head


def value_scores(model, unwrapped, batch: dict) -> torch.Tensor:
    """One fp32 score per row of a right-padded batch: the value head on the final hidden state
    of the row's last real token. `model` runs the forward (maybe wrapped for distributed
    training); `unwrapped` is the model itself, whose output head is skipped (the full
    vocabulary logits are never made)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "use_cache" in inspect.signature(unwrapped.forward).parameters:
        inputs["use_cache"] = False
    with head_as_identity(unwrapped):
        hidden = model(**inputs).logits  # final hidden states
    last = batch["attention_mask"].sum(-1) - 1
    rows = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    return unwrapped.v_head(rows).squeeze(-1).float()


def _as_is(model, setup):
    return model, setup


def _with_value_head(model, setup):
    add_value_head(model)

    def saving_head(save):
        def save_with_head(m, directory):
            with _without_value_head(m):
                save(m, directory)
            save_value_head(m, directory)
        return save_with_head

    return model, dataclasses.replace(
        setup, save_final=saving_head(setup.save_final),
        save_in_checkpoint=saving_head(setup.save_in_checkpoint or (lambda m, d: None)))


LABELS_FILE = "labels.json"
# the transformers Auto class each head loads the model as
MODEL_CLASSES = {"causal_lm": "AutoModelForCausalLM", "value": "AutoModelForCausalLM",
                 "classifier": "AutoModelForSequenceClassification"}


def head_modules(name: str, model) -> list[str]:
    """The modules of head `name` that train in full (the classifier's; none for the others):
    the model's children with parameters outside its base model, and the modules its checkpoint
    lacked (models.load_model_and_tokenizer's `tuneforge_new_modules`)."""
    if name != "classifier":
        return []
    base = getattr(model, "base_model_prefix", "")
    own = [n for n, child in model.named_children() if n != base and any(True for _ in child.parameters())]
    return own + [m for m in getattr(model, "tuneforge_new_modules", []) if m not in own]


def head_targets(name: str, model, finetune):
    """`finetune` (config.FinetuningArguments) with head `name`'s modules added to
    additional_target (peft modules_to_save), for the adapter prepare_model adds."""
    extra = [m for m in head_modules(name, model) if m not in (finetune.additional_target or "").split(",")]
    if not extra:
        return finetune
    given = [t.strip() for t in (finetune.additional_target or "").split(",") if t.strip()]
    return dataclasses.replace(finetune, additional_target=",".join(given + extra))


def save_labels(model, directory: str | Path) -> Path:
    """Write the classifier's id2label / label2id (model.config) to directory/labels.json."""
    import json

    config = model.config
    path = Path(directory) / LABELS_FILE
    path.write_text(json.dumps({"num_labels": config.num_labels,
                                "id2label": {str(k): v for k, v in config.id2label.items()},
                                "label2id": dict(config.label2id)}, indent=2, ensure_ascii=False))
    return path


def _with_classifier(model, setup):
    if setup.kind == "freeze":  # the head trains too (an adapter trains it as modules_to_save)
        for name in head_modules("classifier", model):
            model.get_submodule(name).requires_grad_(True)

    def saving_labels(save):
        def save_with_labels(m, directory):
            save(m, directory)
            save_labels(m, directory)
        return save_with_labels

    return model, dataclasses.replace(
        setup, save_final=saving_labels(setup.save_final),
        save_in_checkpoint=saving_labels(setup.save_in_checkpoint or (lambda m, d: None)))


BUILDERS = {"causal_lm": _as_is, "value": _with_value_head, "classifier": _with_classifier}


def prepare_head(name: str, model, setup):
    """(model, setup) with head `name` on the model and in setup's saves (train.methods'
    TrainableSetup). An unknown name is a programming error (a Stage checks it): KeyError."""
    return BUILDERS[name](model, setup)
