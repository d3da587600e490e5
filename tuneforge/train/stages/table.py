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
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

RECORD_KINDS = {
    "conversations": "alpaca or sharegpt records: instruction/response or chat turns",
    "text": "plain text: one text per record (columns: {prompt: text}) or per line of a .txt file",
    "pairwise": "preference records (ranking: true): a prompt with a chosen and a rejected reply",
    "kto": "feedback records (a kto_tag column): a conversation whose last reply is tagged desirable or not",
    "labels": "a text (columns: {prompt: text}) and a class label (label_column) per record (data/labels.py)",
}
# the YAML keys stages add (stage_key(...) specs by name), filled by register_stage from each
# Stage's `keys`; config.py makes them keys of the finetune section and config_checks refuses one
# set for a stage that does not read it. "stages": the names of the stages that read the key.
STAGE_KEYS: dict[str, dict] = {}
HEADS = {
    "causal_lm": "the model's own language-model head",
    "value": "a scalar value head (v_head.summary: hidden size -> 1) on the last real token",
    "classifier": "transformers' sequence-classification head (AutoModelForSequenceClassification: "
                  "BERT's classifier, a decoder's score), trained in full (peft modules_to_save)",
}


@dataclass(frozen=True)
class Objective:
    """What the loop minimises, prepared for one run's model.

    loss(model, batch) -> (loss_sum, normaliser, metrics): the summed loss of the batch (a
    tensor that backward runs through), what it is a sum over (label tokens, pairs), and metric
    sums over the same normaliser (e.g. {"accuracy": number of pairs ranked right}).
    count(batch) -> the batch's normaliser, known before the forward: the loop divides the loss
    of a whole optimizer step (all its micro-batches, all processes) by their total.
    metrics: the names loss() returns in its metrics dict, on every batch.
    finish(means) -> the metrics as reported, from their means over the normaliser (evaluation,
    and the training log's window): for a metric that is not a mean over the normaliser, e.g.
    KTO's rewards/chosen, a mean over the desirable examples only (its sum over all examples
    divided by their share). None: the means as they are.
    split(model, batch) -> parts: a training micro-batch as smaller batches whose losses sum to
    the micro-batch's, which the loop runs forward and backward one after the other, so only one
    part's activations are alive at a time (the gradient is the same sum, in another order).
    Called under the loop's autocast; values the parts share and that need no gradient (KTO's KL
    estimate, reference log-probabilities) are computed here, once, and carried in the parts.
    None: the micro-batch is one part. Evaluation never splits."""

    loss: Callable[[Any, dict], tuple[Any, int, dict]]
    count: Callable[[dict], int]
    metrics: tuple[str, ...] = ()
    finish: Callable[[dict], dict] | None = None
    split: Callable[[Any, dict], list[dict]] | None = None

    def parts(self, model, batch: dict) -> list[dict]:
        """The parts the loop trains on one after the other: `split(model, batch)`, or [batch]."""
        return self.split(model, batch) if self.split is not None else [batch]

    def report(self, means: dict) -> dict:
        """The metrics as logged: `finish(means)`, or the means."""
        return self.finish(means) if self.finish is not None else means


def _no_extra_metrics(means: dict) -> dict:
    return {}


def stage_key(default, help: str, *, type: str | None = None, choices: tuple | None = None,
              bounds: str | None = None) -> dict:
    """One stage key for a Stage's `keys`: its default, help text, type as an annotation string
    ("float", "Optional[str]"; default: the default's type) and optionally its allowed values or
    numeric interval (config.py's `_f` conventions). Stages that read the same key give the same
    spec (one object, imported from the stage that declares it)."""
    if type is None:
        if default is None:
            raise TypeError("a key whose default is None needs type='Optional[...]'")
        type = default.__class__.__name__
    return {"default": default, "help": help, "type": type, "choices": choices, "bounds": bounds}


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
        gets it with `tuneforge.adapters.disable_adapters`, never from a second copy when an
        adapter trains (full / freeze fine-tuning have no adapter to disable: dpo and kto keep
        a frozen copy then, logged; config refuses pissa_init, which rewrites the base). A bool, or
        a function of the stage's settings ({key: value}) when some settings need none (dpo's
        pref_loss: orpo); `uses_reference(cfg)` answers for a config.
    packing: whether padding-free packed rows may carry its batches (token-level stages).
    keys: the YAML keys only this stage (and others declaring the same spec) reads, name ->
        stage_key(...) spec; e.g. dpo's pref_beta. The objective of a stage with keys gets their
        values as a keyword argument, `settings` ({key: value}), when it takes that parameter, and
        so do its other builders (collator: sft's dynamic_mask_ratio changes batches; encode,
        model_options, evaluate, train). An objective may also take `cfg` (the run's whole Config,
        e.g. kd's teacher loads by the model section's rules). See `bind`.
    config_keys: keys of other config sections its builders read too (grpo: the generate
        section's temperature, top_p, top_k), added to `settings` by name.
    check(settings) -> None: raises ConfigError for settings that contradict each other (e.g.
        sft's use_dft_loss with use_eaft_loss); config validation calls it before anything runs.
    model_options(data_args[, settings]) -> dict: keyword arguments for the model class's
        from_pretrained (train/heads.MODEL_CLASSES[head]), read before the model loads; e.g.
        cls's num_labels and label names from its datasets. None: none.
    evaluate(cfg, limit[, settings]) -> results: what `tuneforge eval` runs for a config of this
        stage (cls: the classifier's accuracy on the eval split). None: eval scores sft data only.
    train(run_once, model, splits, tokenizer, cfg[, settings][, resume_from]) -> (run, results): a
        stage that trains in rounds (semi's self-training) runs the one loop several times through
        `run_once(train_examples, output_dir, resume_from=None) -> (run, results)`, each run training
        `model` on from its current weights, or from checkpoint `resume_from` (workflows._runs_of);
        the last run's model is saved. `resume_from`: the checkpoint the run resumes from (the
        newest across the rounds' folders and output_dir, train/resume.py), None when it starts
        over. None: one run.
    round_folders(output_dir[, settings]) -> [Path]: where a stage with `train` writes the rounds
        before the last (inside output_dir; the last one writes to output_dir): their checkpoints
        are the run's too, for resuming, and starting over clears them.
    part_tokens: where the objective runs training micro-batches as parts (Objective.split), the
        most token positions of a part: "cutoff_len" (sft, pt: whole examples up to the run's
        cutoff_len) or a number (dpo, kto: train/parts.PART_TOKENS); None: micro-batches run whole.
        What the memory plan counts (train/memory_plan.py forward_tokens).
    plot: the stage's own metrics that `plot_loss: true` draws beside the loss, each with its
        eval_ counterpart where evaluation logged it (train/plot.py; LLaMA-Factory draws
        rewards/accuracies for dpo, accuracy for rm)."""

    name: str
    help: str
    records: str
    encode: Callable
    collator: Callable
    objective: Callable[..., Objective]
    eval_metrics: Callable[[dict], dict] = _no_extra_metrics
    head: str = "causal_lm"
    needs_reference: bool | Callable[[dict], bool] = False
    packing: bool = True
    keys: dict = dataclasses.field(default_factory=dict)
    config_keys: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None
    model_options: Callable | None = None
    evaluate: Callable | None = None
    train: Callable | None = None
    round_folders: Callable | None = None
    part_tokens: int | str | None = None
    plot: tuple[str, ...] = ()

    def __post_init__(self):
        if self.records not in RECORD_KINDS:
            raise ValueError(f"stage {self.name!r}: records must be one of {', '.join(RECORD_KINDS)}")
        if self.head not in HEADS:
            raise ValueError(f"stage {self.name!r}: head must be one of {', '.join(HEADS)}")

    def settings(self, cfg) -> dict:
        """This stage's keys (`keys`, then `config_keys`) with their values in `cfg` (a config.Config)."""
        values = {name: getattr(cfg.finetune, name) for name in self.keys}
        flat = cfg.to_dict() if self.config_keys else {}
        return {**values, **{name: flat[name] for name in self.config_keys}}

    def uses_reference(self, cfg) -> bool:
        """Whether a run of `cfg` compares with the model before training (needs_reference)."""
        if callable(self.needs_reference):
            return bool(self.needs_reference(self.settings(cfg)))
        return self.needs_reference

    def bind(self, function: Callable, config, **extra) -> Callable:
        """`function` (one of this stage's callables) with what it takes by name bound: `settings`
        (this stage's keys with their values in `config`, a config.Config) and each of `extra` (e.g. cfg=, tokenizer=)."""
        import inspect

        params = inspect.signature(function).parameters
        bound = {name: value for name, value in extra.items() if name in params}
        if (self.keys or self.config_keys) and "settings" in params:
            bound["settings"] = self.settings(config)
        return functools.partial(function, **bound) if bound else function

    def objective_for(self, cfg, tokenizer=None) -> Callable[..., Objective]:
        """The objective builder TrainingRun calls, with `settings`, `cfg` (the whole Config) and
        `tokenizer` (the run's) bound where it takes them (`bind`)."""
        return self.bind(self.objective, cfg, cfg=cfg, tokenizer=tokenizer)

    def collator_for(self, cfg) -> Callable:
        """The collator builder `tuneforge train` calls, with `settings` bound when it takes them."""
        return self.bind(self.collator, cfg)


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add `stage` to the table (a name registered twice is a programming error: ValueError)."""
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    for name, spec in stage.keys.items():
        known = STAGE_KEYS.get(name)
        if known is not None and {k: v for k, v in known.items() if k != "stages"} != spec:
            raise ValueError(f"stage {stage.name!r} declares key {name!r} unlike stage(s) "
                             f"{', '.join(known['stages'])}: share one spec")
        STAGE_KEYS[name] = {**spec, "stages": (*(known or {}).get("stages", ()), stage.name)}
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """The registered stage called `name`; KeyError for an unknown one (config validation
    refuses those first, naming the key)."""
    return STAGES[name]


def stages_help() -> str:
    """The `stage:` key's help: every registered stage with its one line."""
    return "Training stage: " + "; ".join(f"{s.name}: {s.help}" for s in STAGES.values()) + "."
