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
  log, checkpoints and train_results.json to output_dir/round_<k>, the last one to output_dir, where the
  final adapter goes. Each round k >= 1 keeps the pseudo-labels it trains on in its folder's
  pseudo_labels.json (which unlabelled example, the class given, its probability, its gold label).
- Per round, the log says how many unlabelled examples were pseudo-labelled, how many of those were
  right when the unlabelled set has gold labels (in label_column; reported, never trained on), and the
  eval accuracy; train_results.json holds them as round_<k>_pseudo_labelled / _pseudo_accuracy /
  _eval_accuracy.
- Resume after a kill as any run does (train/resume.py): the newest checkpoint across the rounds' folders
  says which round to go on with; that round's examples are the labelled ones plus its
  pseudo_labels.json, its weights, optimizer and RNG come from the checkpoint, and the later rounds run
  as they would have (each round k >= 1 starting from the initial weights with seed + k), so the final
  adapter is the uninterrupted run's. The earlier rounds' numbers come from their train_results.json."""

from __future__ import annotations

import json
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


PSEUDO_FILE = "pseudo_labels.json"
RESULTS_FILE = "train_results.json"


def round_folders(output_dir, settings: dict) -> list[Path]:
    """The folders of the rounds before the last (Stage.round_folders): output_dir/round_<k>."""
    return [Path(output_dir) / f"round_{k}" for k in range(settings["semi_rounds"])]


def pseudo_label(model, examples: list[dict], pad_token_id, threshold: float, batch_size: int) -> list[dict]:
    """The examples whose top class probability under `model` is at least `threshold`, as
    {"index": position in `examples`, "label": the predicted class id, "confidence": its probability,
    "gold": the example's own label, None without one}, in the order of `examples`."""
    from ...data.labels import NO_LABEL

    probs = cls.predict(model, examples, pad_token_id, batch_size)
    confidence, predicted = probs.max(-1) if len(examples) else (probs, probs)
    return [{"index": i, "label": p, "confidence": c, "gold": None if example["label"] == NO_LABEL else example["label"]}
            for i, (example, p, c) in enumerate(zip(examples, predicted.tolist(), confidence.tolist()))
            if c >= threshold]


def as_examples(pseudo: list[dict], unlabeled: list[dict]) -> list[dict]:
    """Training examples of pseudo-labels: the unlabelled example's tokens with the class given."""
    return [{"input_ids": unlabeled[p["index"]]["input_ids"], "label": p["label"]} for p in pseudo]


def gold_counts(pseudo: list[dict]) -> tuple[int, int]:
    """(how many pseudo-labels have a gold label, how many of those are right)."""
    known = [p for p in pseudo if p["gold"] is not None]
    return len(known), sum(p["label"] == p["gold"] for p in known)


def write_pseudo_labels(folder: Path, k: int, pseudo: list[dict], unlabeled: int, threshold: float) -> None:
    """Round k's pseudo-labels into folder/pseudo_labels.json (whole or not at all)."""
    from .. import outputs

    folder.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(folder / PSEUDO_FILE, json.dumps(
        {"round": k, "unlabeled_examples": unlabeled, "pseudo_label_threshold": threshold, "examples": pseudo},
        indent=1))


def read_pseudo_labels(folder: Path, k: int, unlabeled: int) -> tuple[list[dict], float | None]:
    """(the pseudo-labels round k trained on, the threshold they were made at), to resume it. Raises
    CheckpointError (one line naming the file) for a missing or damaged file, another round's, or one
    made for another unlabelled set."""
    from ...errors import CheckpointError
    from ...fileio import read_json

    path = folder / PSEUDO_FILE
    again = "start over with overwrite_output_dir: true"
    if not path.is_file():
        raise CheckpointError(f"cannot resume semi round {k}: '{path}' (the pseudo-labels it trains on) is "
                              f"missing; {again}")
    saved = read_json(path, "pseudo-label file", CheckpointError)
    if not isinstance(saved, dict) or not isinstance(saved.get("examples"), list):
        raise CheckpointError(f"'{path}' is not a pseudo-label file (no 'examples' list); {again}")
    if saved.get("round") != k:
        raise CheckpointError(f"'{path}' holds round {saved.get('round')}'s pseudo-labels, but with this "
                              f"semi_rounds that folder is round {k}: set semi_rounds as that run had it to "
                              f"resume, or {again}")
    if saved.get("unlabeled_examples") != unlabeled:
        raise CheckpointError(f"'{path}' was made for {saved.get('unlabeled_examples')} unlabelled examples and "
                              f"unlabeled_dataset now has {unlabeled}: use that run's data to resume, or {again}")
    for n, p in enumerate(saved["examples"]):
        if not (isinstance(p, dict) and isinstance(p.get("index"), int) and 0 <= p["index"] < unlabeled
                and isinstance(p.get("label"), int) and p["label"] >= 0):
            raise CheckpointError(f"'{path}': example {n} needs an 'index' below {unlabeled} and a class 'label' "
                                  f"(whole numbers); {again}")
    made_at = saved.get("pseudo_label_threshold")
    return [{"gold": None, **p} for p in saved["examples"]], made_at if isinstance(made_at, (int, float)) else None


def trainable_state(model) -> dict:
    """A copy of the weights the run trains (checkpoint.trainable_state: the adapter and the classifier
    head, all weights in full fine-tuning, BAdam's blocks), to start each round from."""
    from ..checkpoint import trainable_state as trained

    return {name: tensor.clone() for name, tensor in trained(model).items()}


def restore(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])


def train_rounds(run_once, model, splits, tokenizer, cfg, settings: dict, resume_from: Path | None = None):
    """The labelled-only run, then semi_rounds of pseudo-labelling and training anew from the initial
    weights, from the round of checkpoint `resume_from` on when one is given; returns the last
    (run, results) with every round's numbers added to the results. Raises CheckpointError when the
    resumed round's pseudo-labels cannot be read."""
    from accelerate.utils import set_seed

    from .. import outputs

    out = Path(cfg.train.output_dir)
    rounds, threshold = settings["semi_rounds"], settings["pseudo_label_threshold"]
    folders = [*round_folders(out, settings), out]
    unlabeled = splits.extra["unlabeled"]
    initial = trainable_state(model)  # the same in a resumed run: the same seed made it
    start = 0 if resume_from is None else _round_of(resume_from, folders)
    pseudo, made_at = read_pseudo_labels(folders[start], start, len(unlabeled)) if start else ([], threshold)
    summary = _earlier_rounds(folders[:start])
    if start:
        log.info("semi: %s finished earlier (numbers from %s); round %d resumes on its %s",
                 "round 0" if start == 1 else f"rounds 0-{start - 1}", "round_0/" + RESULTS_FILE if start == 1
                 else f"round_<k>/{RESULTS_FILE}", start, PSEUDO_FILE)
    if start and made_at != threshold:  # a changed key applies from the next pseudo-labelling on
        log.warning("semi round %d resumes on pseudo-labels made at pseudo_label_threshold %s (%s); %s applies from "
                    "round %d on", start, made_at, folders[start] / PSEUDO_FILE, threshold, start + 1)
    run = None
    for k in range(start, rounds + 1):
        resuming = resume_from if k == start else None
        if k > start:  # (round 0 has no pseudo-labels; a resumed round's were read above)
            # the latest model is the teacher; a new student trains from the initial weights
            teacher = run.acc.unwrap_model(run.model)
            pseudo = pseudo_label(teacher, unlabeled, tokenizer.pad_token_id, threshold,
                                  cfg.train.per_device_eval_batch_size)
            made_at = threshold
            if run.acc.is_main_process:
                write_pseudo_labels(folders[k], k, pseudo, len(unlabeled), threshold)
            restore(model, initial)  # the teacher's mistakes are not trained on twice
            set_seed(cfg.train.seed + k)  # a round's dropout does not depend on the rounds before it
        gold, right = gold_counts(pseudo)
        log.info("semi round %d: %d labelled + %d pseudo-labelled examples%s", k, len(splits.train), len(pseudo),
                 f" ({len(pseudo)} of {len(unlabeled)} unlabelled at threshold {made_at}"
                 + (f", {right} of {gold} right by their gold labels)" if gold else ")") if k else "")
        run, results = run_once(splits.train + as_examples(pseudo, unlabeled), folders[k], resuming)
        numbers = {f"round_{k}_pseudo_labelled": len(pseudo),
                   f"round_{k}_pseudo_accuracy": right / gold if gold else None,
                   f"round_{k}_eval_accuracy": results.get("eval_accuracy")}
        summary.update(numbers)
        log.info("semi round %d: eval_accuracy %s", k, _number(results.get("eval_accuracy")))
        if k < rounds and run.acc.is_main_process:  # the last round's results go with the adapter
            with outputs.disk_errors(folders[k], f"round {k}'s results"):
                outputs.atomic_write_text(folders[k] / RESULTS_FILE, json.dumps({**results, **numbers}, indent=2))
    return run, {**results, **summary}


def _round_of(checkpoint: Path, folders: list[Path]) -> int:
    """Which round a checkpoint belongs to, by its folder (train/resume.py only passes this run's)."""
    where = Path(checkpoint).resolve().parent
    return [folder.resolve() for folder in folders].index(where)


def _earlier_rounds(folders: list[Path]) -> dict:
    """The numbers of the rounds finished before the resumed one, from their train_results.json (a
    missing or unreadable file: the round's numbers are None, with one warning line)."""
    summary = {}
    for k, folder in enumerate(folders):
        keys = [f"round_{k}_pseudo_labelled", f"round_{k}_pseudo_accuracy", f"round_{k}_eval_accuracy"]
        try:
            saved = json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            log.warning("semi round %d: %s is missing or unreadable; its numbers are left out of the results",
                        k, folder / RESULTS_FILE)
            saved = {}
        summary.update({key: saved.get(key) for key in keys})
    return summary


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
    round_folders=round_folders,
    plot=("accuracy",),
))
