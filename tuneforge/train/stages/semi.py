"""stage: semi, semi-supervised classification by self-training (pseudo-labelling, Lee 2013, "Pseudo-Label:
The Simple and Efficient Semi-Supervised Learning Method for Deep Neural Networks"): the classifier of
stage: cls (its data, head, loss and metrics) trained first on the labelled `dataset`, then for each of
`semi_rounds` rounds: the model predicts the `unlabeled_dataset`, the examples whose top class
probability is at least `pseudo_label_threshold` join the labelled ones with their predicted class, and
training continues on them.

- Each round trains anew from the initial weights (the adapter and head as they were before round 0;
  a fresh optimizer and schedule) on the labelled examples plus the pseudo-labelled ones: the model
  that made the pseudo-labels is the teacher, the next round's model a new student (classic
  self-training; Xie et al. 2020's noisy student). Continuing the teacher instead would train on its
  own confident predictions, which it already fits (little to learn from them: a word that only
  appears beside one the teacher knows is explained away) and whose mistakes it would reinforce.
  The pseudo-labels are made anew each round by the latest model (not accumulated).
- Every round is one run of the one training loop (Stage.train's `run_once`): round k < last writes its
  log and checkpoints to output_dir/round_<k>, the last one to output_dir, where the final adapter goes.
- Per round, the log says how many unlabelled examples were pseudo-labelled, how many of those were
  right when the unlabelled set has gold labels (in label_column; reported, never trained on), and the
  eval accuracy; train_results.json holds them as round_<k>_pseudo_labelled / _pseudo_accuracy /
  _eval_accuracy.
- A semi run does not resume from a checkpoint (a round's examples depend on the previous rounds)."""

from __future__ import annotations

import logging
from pathlib import Path

from . import cls
from .table import Stage, register_stage, stage_key

log = logging.getLogger("tuneforge")

KEYS = {
    **cls.KEYS,
    "unlabeled_dataset": stage_key(None, "stage: semi: comma-separated dataset names (dataset_info.json) of "
                                         "unlabelled texts to pseudo-label (a label column there is read as gold "
                                         "labels for reporting only).", type="Optional[str]"),
    "pseudo_label_threshold": stage_key(0.9, "stage: semi: an unlabelled example joins the training data when "
                                             "the model's top class probability is at least this.",
                                        bounds="[0, 1]"),
    "semi_rounds": stage_key(2, "stage: semi: pseudo-labelling rounds after the labelled-only training "
                                "(each one predicts the unlabelled set and trains on).", bounds="[1, inf)"),
}


def _need_unlabeled(settings: dict) -> None:
    from ...errors import ConfigError

    if not settings["unlabeled_dataset"]:
        raise ConfigError("stage: semi needs unlabeled_dataset: <names from dataset_info.json> (texts to "
                          "pseudo-label); or use stage: cls for labelled data alone")


def model_options(data_args, settings: dict) -> dict:
    """cls's (the classes of the labelled data), once unlabeled_dataset is known to be set."""
    _need_unlabeled(settings)
    return cls.model_options(data_args, settings)


def encode(data_args, tokenizer, seed: int, settings: dict):
    """cls's examples, plus the unlabelled ones in `extra["unlabeled"]` (label: gold or data.labels.NO_LABEL).
    Raises ConfigError without unlabeled_dataset, DataError."""
    from ...data.labels import load_unlabelled

    _need_unlabeled(settings)
    splits = cls.encode(data_args, tokenizer, seed, settings)
    labels = cls.label_set(data_args, settings)
    splits.extra["unlabeled"] = load_unlabelled(data_args, settings["unlabeled_dataset"], tokenizer, labels,
                                                settings["label_column"], seed)
    return splits


def pseudo_label(model, examples: list[dict], pad_token_id, threshold: float, batch_size: int):
    """(pseudo-labelled examples, how many of them have a gold label, how many of those are right)."""
    from ...data.labels import NO_LABEL

    probs = cls.predict(model, examples, pad_token_id, batch_size)
    confidence, predicted = probs.max(-1) if len(examples) else (probs, probs)
    chosen, gold, right = [], 0, 0
    for example, p, c in zip(examples, predicted.tolist(), confidence.tolist()):
        if c >= threshold:
            chosen.append({"input_ids": example["input_ids"], "label": p})
            if example["label"] != NO_LABEL:
                gold += 1
                right += int(example["label"] == p)
    return chosen, gold, right


def trainable_state(model) -> dict:
    """A copy of the trainable weights (the adapter and the classifier head; all weights in full
    fine-tuning), to start each round from."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])


def train_rounds(run_once, model, splits, tokenizer, cfg, settings: dict):
    """The labelled-only run, then semi_rounds of pseudo-labelling and training anew from the initial
    weights; returns the last (run, results) with every round's numbers added to the results."""
    out = Path(cfg.train.output_dir)
    rounds = settings["semi_rounds"]
    unlabeled = splits.extra["unlabeled"]
    initial = trainable_state(model)
    run, results = run_once(splits.train, out / "round_0")
    summary = {"round_0_pseudo_labelled": 0, "round_0_eval_accuracy": results.get("eval_accuracy")}
    log.info("semi round 0: %d labelled examples, eval_accuracy %s", len(splits.train),
             _number(results.get("eval_accuracy")))
    for k in range(1, rounds + 1):
        model = run.acc.unwrap_model(run.model)
        pseudo, gold, right = pseudo_label(model, unlabeled, tokenizer.pad_token_id,
                                           settings["pseudo_label_threshold"], cfg.train.per_device_eval_batch_size)
        restore(model, initial)  # a new student: the teacher's mistakes are not trained on twice
        run, results = run_once(splits.train + pseudo, out if k == rounds else out / f"round_{k}")
        summary.update({f"round_{k}_pseudo_labelled": len(pseudo),
                        f"round_{k}_pseudo_accuracy": right / gold if gold else None,
                        f"round_{k}_eval_accuracy": results.get("eval_accuracy")})
        log.info("semi round %d: %d of %d unlabelled examples pseudo-labelled (threshold %.2f)%s; eval_accuracy %s",
                 k, len(pseudo), len(unlabeled), settings["pseudo_label_threshold"],
                 f", {right} of {gold} right by their gold labels" if gold else "",
                 _number(results.get("eval_accuracy")))
    return run, {**results, **summary}


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


register_stage(Stage(
    name="semi",
    help="semi-supervised classification (self-training): cls on the labelled dataset, then rounds that "
         "pseudo-label unlabeled_dataset above pseudo_label_threshold and train on",
    records="labels",
    encode=encode,
    collator=cls.collator,
    objective=cls.classification_objective,
    head="classifier",
    packing=False,
    keys=KEYS,
    model_options=model_options,
    evaluate=cls.evaluate,
    train=train_rounds,
    plot=("accuracy",),
))
