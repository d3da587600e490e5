"""stage: cls, sequence classification (the seeds' BERT / DistilBERT example): a text and a class
label per record (data/labels.py; `columns: {prompt: text}`, the label in `label_column`), the model
loaded as transformers' AutoModelForSequenceClassification with the data's classes (num_labels,
id2label / label2id; train/heads.py "classifier"), LoRA on its layers (lora_target: query,value for
BERT, or all) with the classifier head trained in full and saved as peft modules_to_save
(task_type SEQ_CLS: peft's PeftModel.from_pretrained on AutoModelForSequenceClassification loads it).

Loss: cross-entropy summed over the batch's examples (normaliser: examples); metric: accuracy,
logged as eval_accuracy (and in train_results.json). Batches are padded (packing: no)."""

from __future__ import annotations

import dataclasses

from .table import Objective, Stage, register_stage, stage_key

KEYS = {
    "num_labels": stage_key(0, "Number of classes of stage cls / semi; 0 counts them in the data (ids: the "
                               "largest + 1; names: how many).", bounds="[0, inf)"),
    "label_column": stage_key("label", "Column of the class label (an id from 0, or a name; names map to "
                                       "ids in sorted order) for stage cls / semi."),
}


def label_set(data_args, settings: dict, extra: tuple[str, ...] = ()):
    """The run's classes (data.labels.LabelSet) from its datasets and the stage's keys."""
    from ...data.labels import read_label_set

    return read_label_set(data_args, settings["label_column"], settings["num_labels"], extra)


def model_options(data_args, settings: dict) -> dict:
    """num_labels, id2label, label2id for the classifier, from the data (read before the model loads)."""
    return label_set(data_args, settings).model_options()


def encode(data_args, tokenizer, seed: int, settings: dict):
    """Classification records -> {"input_ids", "label"} examples (train, and eval from val_size or
    eval_dataset). Raises DataError, ConfigError."""
    from ...data.labels import load_labelled

    return load_labelled(data_args, tokenizer, label_set(data_args, settings), settings["label_column"], seed)


def collator(data_args, model, tokenizer):
    from ...data.labels import LabelCollator
    from ..packing import CollatorChoice

    return CollatorChoice(LabelCollator(tokenizer.pad_token_id), None, lambda: None)


def example_count(batch: dict) -> int:
    return int(batch["labels"].numel())


def class_logits(model, batch: dict):
    """The classifier's fp32 logits (examples, num_labels) for a padded batch."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def classification_objective(model, unwrapped, sample_batch: dict, train_args, autocast) -> Objective:
    """Cross-entropy summed over the batch's examples; metrics: the number classified right."""
    import torch.nn.functional as F

    def loss(run_model, batch: dict):
        logits = class_logits(run_model, batch)
        labels = batch["labels"]
        return (F.cross_entropy(logits, labels, reduction="sum"), example_count(batch),
                {"accuracy": int((logits.argmax(-1) == labels).sum())})

    return Objective(loss, example_count, ("accuracy",))


def predict(model, examples: list[dict], pad_token_id, batch_size: int = 32):
    """Class probabilities (examples, num_labels) of `examples` under `model` (eval mode, no grad;
    training mode is restored)."""
    import torch

    from ...data.labels import LabelCollator

    collate, was_training, out = LabelCollator(pad_token_id), model.training, []
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
            out.append(class_logits(model, batch).softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def saved_label_set(cfg, settings: dict):
    """The classes of the adapter being evaluated (its labels.json, train/heads.py), else the data's."""
    import json
    from pathlib import Path

    from ...data.labels import LabelSet
    from ...models import split_paths
    from ..heads import LABELS_FILE

    paths = split_paths(cfg.model.adapter_name_or_path)
    file = Path(paths[-1]) / LABELS_FILE if paths else None
    if file is None or not file.is_file():
        return label_set(cfg.data, settings)
    names = json.loads(file.read_text(encoding="utf-8"))["id2label"]
    names = tuple(names[str(i)] for i in range(len(names)))
    return LabelSet(len(names), None if names == tuple(str(i) for i in range(len(names))) else names)


def evaluate(cfg, limit: int | None, settings: dict) -> dict:
    """`tuneforge eval` for stage: cls: the classifier (model_name_or_path with the adapter in
    adapter_name_or_path) on the eval split (eval_dataset, or val_size of dataset split as training
    split it): {"eval_loss", "eval_accuracy", "eval_examples"}, also written to
    output_dir/eval_results.json when output_dir is set. Raises ConfigError, DataError, ModelError."""
    import json
    from pathlib import Path

    import torch

    from ...data.labels import load_labelled
    from ...errors import ConfigError, DataError
    from ...loading import load_for_use
    from ..heads import MODEL_CLASSES

    if not cfg.data.eval_dataset and not cfg.data.val_size:
        raise ConfigError("`tuneforge eval` needs eval data: set eval_dataset: <names> "
                          "or dataset: <names> with val_size: <fraction or count>")
    labels = saved_label_set(cfg, settings)
    ready = load_for_use(cfg, "classify", model_class=MODEL_CLASSES["classifier"],
                         model_options=labels.model_options())
    data = cfg.data if cfg.data.dataset else dataclasses.replace(cfg.data, dataset=cfg.data.eval_dataset,
                                                                 eval_dataset=None, val_size=0)
    splits = load_labelled(data, ready.tokenizer, labels, settings["label_column"], cfg.train.seed)
    examples = (splits.eval if splits.eval is not None else splits.train)[:limit or None]
    if not examples:
        raise DataError("the eval split is empty: raise val_size or check eval_dataset")
    probs = predict(ready.model, examples, ready.tokenizer.pad_token_id, cfg.train.per_device_eval_batch_size)
    gold = torch.tensor([e["label"] for e in examples])
    results = {"eval_loss": float(-probs[torch.arange(len(gold)), gold].clamp_min(1e-12).log().mean()),
               "eval_accuracy": float((probs.argmax(-1) == gold).float().mean()), "eval_examples": len(gold)}
    if cfg.train.output_dir:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=2))
    return results


register_stage(Stage(
    name="cls",
    help="sequence classification (text + label, e.g. an encoder such as BERT / MiniLM): a classifier head "
         "trained with cross-entropy, LoRA on the layers, eval_accuracy",
    records="labels",
    encode=encode,
    collator=collator,
    objective=classification_objective,
    head="classifier",
    packing=False,
    keys=KEYS,
    model_options=model_options,
    evaluate=evaluate,
    plot=("accuracy",),
))
