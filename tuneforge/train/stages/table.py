"""The stage record and the one table of stages.

A stage is what a training run optimises: which records it reads, how a record becomes tensors,
how tensors become batches, and the objective `(model, batch) -> (loss_sum, normaliser,
metrics)` that the one training loop (train/loop.py) minimises. Each stage lives in its own file
in this folder and registers itself with one `register_stage(Stage(...))` call at its bottom;
the CLI (`tuneforge keys`), config validation (`stage:` and the combinations in config_checks)
and the web UI read this table.

The table is read when a config is validated, so a stage file imports nothing heavy at its top
(torch, transformers, tuneforge.data): it imports them inside the functions it registers, which
only run when a training run starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RECORD_KINDS = {
    "conversations": "alpaca or sharegpt records: instruction/response or chat turns",
    "text": "plain text: one text per record (columns: {prompt: text}) or per line of a .txt file",
    "pairwise": "preference records (ranking: true): a prompt with a chosen and a rejected reply",
}
HEADS = {
    "causal_lm": "the model's own language-model head",
    "value": "a scalar value head (v_head.summary: hidden size -> 1) on the last real token",
}


@dataclass(frozen=True)
class Objective:
    """What the loop minimises, prepared for one run's model.

    loss(model, batch) -> (loss_sum, normaliser, metrics): the summed loss of the batch (a
    tensor that backward runs through), what it is a sum over (label tokens, pairs), and metric
    sums over the same normaliser (e.g. {"accuracy": number of pairs ranked right}).
    count(batch) -> the batch's normaliser, known before the forward: the loop divides the loss
    of a whole optimizer step (all its micro-batches, all processes) by their total.
    metrics: the names loss() returns in its metrics dict, on every batch."""

    loss: Callable[[Any, dict], tuple[Any, int, dict]]
    count: Callable[[dict], int]
    metrics: tuple[str, ...] = ()


def _no_extra_metrics(means: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Stage:
    """One training stage (the `stage:` config key's value).

    name: the `stage:` value. help: one line for `tuneforge keys` and the web UI.
    records: the record kind it reads (a key of RECORD_KINDS).
    encode(data_args, tokenizer, seed) -> data.DatasetSplits: read the datasets, make examples.
    collator(data_args, model, tokenizer) -> train.packing.CollatorChoice: examples -> batches.
    objective(model, unwrapped, sample_batch, train_args, autocast) -> Objective: called once by
        TrainingRun with the model it runs (maybe wrapped for distributed training), the model
        itself, the first micro-batch (for probes) and the training's autocast context.
    eval_metrics(means) -> extra results from the eval means ({"loss": ..., metric: ...}),
        e.g. perplexity.
    head: what the model needs on top of its decoder (a key of HEADS); train/heads.py builds it.
    needs_reference: the objective compares with the model before training (DPO-like); it
        gets it with `tuneforge.adapters.disable_adapters`, never from a second copy.
    packing: whether padding-free packed rows may carry its batches (token-level stages)."""

    name: str
    help: str
    records: str
    encode: Callable
    collator: Callable
    objective: Callable[..., Objective]
    eval_metrics: Callable[[dict], dict] = _no_extra_metrics
    head: str = "causal_lm"
    needs_reference: bool = False
    packing: bool = True

    def __post_init__(self):
        if self.records not in RECORD_KINDS:
            raise ValueError(f"stage {self.name!r}: records must be one of {', '.join(RECORD_KINDS)}")
        if self.head not in HEADS:
            raise ValueError(f"stage {self.name!r}: head must be one of {', '.join(HEADS)}")


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add `stage` to the table (a name registered twice is a programming error: ValueError)."""
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """The registered stage called `name`; KeyError for an unknown one (config validation
    refuses those first, naming the key)."""
    return STAGES[name]


def stages_help() -> str:
    """The `stage:` key's help: every registered stage with its one line."""
    return "Training stage: " + "; ".join(f"{s.name}: {s.help}" for s in STAGES.values()) + "."
