"""The one training loop, on accelerate, shared by every stage. Readable top to bottom: build
the optimizer and the schedule, maybe resume, then for each optimizer step run
`gradient_accumulation_steps` micro-batches whose summed loss is normalised by the objective's
count over the whole step (label tokens, pairs: so accumulation equals one big batch; a stage
may run each micro-batch as parts, one forward and backward at a time: Objective.split), clip,
step, log, evaluate, checkpoint. The objective comes from the stage (train/stages/); the loop
knows no stage. A NaN/inf loss stops the run before its step is applied; Ctrl-C / SIGTERM stop
it at a step boundary with a checkpoint (stop.py)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..adapters import training_hooks
from ..data.collate import TASK_ID
from ..distributed.sharded import gathered, is_sharded
from ..distributed.plugins import name_layers_to_wrap
from ..threads import follow_free_cores
from . import checkpoint as ckpt
from . import parts, schedule, stop
from .batches import MicroBatchStream, StreamBatches, eval_batches, fingerprint
from .optim import build_optimizer, hyper_parameters
from .reporting import Reporter, read_log
from .trackers import report_targets, start_trackers
from .resume import check_data_record, check_not_past_the_end
from .stages.table import Objective

log = logging.getLogger("tuneforge")


def real_tokens(batch: dict) -> int:
    """Non-padding tokens; a batch without a 2-D attention_mask (packed rows, shared-prefix rows
    with their 4-D mask) has no padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()


def count_steps(n_micro_batches_per_epoch: int, args) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(n_micro_batches_per_epoch * args.num_train_epochs
                            / args.gradient_accumulation_steps))


def mixed_precision(args, device_type: str, bf16_fast: bool) -> str:
    if args.fp16 and device_type == "cuda":
        return "fp16"
    wants_bf16 = bf16_fast if args.bf16 is None else args.bf16
    return "bf16" if wants_bf16 and bf16_fast else "no"


def _no_extra_metrics(means: dict) -> dict:
    return {}


class TrainingRun:
    """One run of the loop. `objective(model, unwrapped, sample_batch, train_args, autocast)`
    makes the Objective this run minimises (a Stage's `objective`); `eval_metrics(means)` adds
    results computed from the eval means (a Stage's `eval_metrics`, e.g. perplexity)."""

    def __init__(self, cfg, model, train_examples, eval_examples, collate, setup,
                 accelerator: Accelerator, objective, eval_metrics=_no_extra_metrics):
        self.cfg, self.args = cfg, cfg.train
        self.acc = accelerator
        self.setup = setup
        self.collate = collate
        self.eval_examples = eval_examples or []
        self.output_dir = Path(self.args.output_dir)
        streaming = getattr(train_examples, "streaming", False)  # data.streaming (streaming: true)
        self.stream = StreamBatches(train_examples, self.args.per_device_train_batch_size, collate,
                                    accelerator.process_index, accelerator.num_processes) if streaming else \
            MicroBatchStream(train_examples, self.args.per_device_train_batch_size,
                             collate, self.args.seed, accelerator.process_index,
                             accelerator.num_processes)
        self.total_steps = count_steps(self.stream.per_epoch, self.args)
        # a method's settings that need the run's length (AdaLoRA's schedule), before output_dir is touched
        training_hooks.check_run(model, self.total_steps)
        optimizer = build_optimizer(model, self.args, cfg.finetune)  # weight decay / LoRA+ groups
        self.scheduler, schedule_record = schedule.build_scheduler(optimizer, self.args,
                                                                   self.total_steps)
        name_layers_to_wrap(accelerator, model)  # FSDP2: per-layer units also where the model names none
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        built = objective(self.model, accelerator.unwrap_model(self.model), self.stream.get(0), self.args,
                          accelerator.autocast)
        # micro-batches run whole where an adapter adds a term of each whole forward (lora_moe)
        self.objective: Objective = parts.keep_whole(built, accelerator.unwrap_model(self.model))
        self.eval_metrics = eval_metrics
        self.step_metrics: dict[str, float] = {}  # the last step's objective metric sums
        self.data_record = {
            "world_size": accelerator.num_processes,
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "seed": self.args.seed, "num_examples": None if streaming else len(train_examples),
            "examples": train_examples.fingerprint() if streaming else fingerprint(train_examples),
        }
        self.state = ckpt.TrainerState(total_steps=self.total_steps, seed=self.args.seed,
                                       data=self.data_record, schedule=schedule_record)
        self.resume_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self._rng_state: dict | None = None
        self._clock: float | None = None  # perf_counter() at which this run's training time was 0

    def restore(self, path: Path) -> None:
        """Load a checkpoint (integrity.py accepted it) into the model and optimizer, before
        output_dir is touched, and move this run's schedule to its step: the current config's
        learning rates, weight decay, betas, eps and schedule apply from there (one warning
        line says what changed, when a step is left to train). Its RNG states are set when
        `run` starts.

        Raises CheckpointError when it is past this run's last step (nothing to train), when its
        data position means other examples in this run (`resume.check_data_record`), or when its
        weights or optimizer state do not fit the model."""
        saved = ckpt.read_state(path)
        check_not_past_the_end(path, saved.global_step, self.total_steps, self.args)
        check_data_record(path, saved.data, self.data_record)
        now_groups = hyper_parameters(self.optimizer.param_groups)
        model = self.acc.unwrap_model(self.model)
        state, rng, then_groups = ckpt.load_checkpoint(path, model, self.optimizer)
        self._rng_state = ckpt.rank_rng_state(rng, self.acc.process_index)
        schedule.move_to(self.scheduler, state.global_step)
        changed = schedule.changes(then_groups, now_groups, state, self.state)
        if changed and state.global_step < self.total_steps and self.acc.is_main_process:
            log.warning("resuming from %s with changed settings (%s): this run's schedule "
                        "applies, so step %d runs at learning rate %.4g", path, ", ".join(changed),
                        state.global_step + 1, self.optimizer.param_groups[0]["lr"])
        state.total_steps, state.data = self.total_steps, self.data_record
        state.schedule = self.state.schedule
        self.state, self.resume_from, self.last_checkpoint = state, path, path

    # -- pieces -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval means over the whole eval split: {"loss": ..., <each objective metric>: ...}; with
        multi-task data (examples carrying a task id) also "loss_<task>" per task (the dataset name),
        from the same forwards: the split is evaluated task by task."""
        self.model.eval()
        names = self.objective.metrics
        tasks = _task_names(self.cfg, self.eval_examples)
        groups = [[e for e in self.eval_examples if e[TASK_ID] == t] for t in range(len(tasks))] \
            if tasks else [self.eval_examples]
        total = torch.zeros(len(groups), 2 + len(names), device=self.acc.device, dtype=torch.float64)
        for g, examples in enumerate(groups):
            for batch in eval_batches(examples, self.args.per_device_eval_batch_size,
                                      self.collate, self.acc.process_index, self.acc.num_processes):
                batch = {k: v.to(self.acc.device) for k, v in batch.items()}
                # a method's per-batch side information (AdapterMethod.batch_context: task ids)
                with self.acc.autocast(), training_hooks.batch_context(self.acc.unwrap_model(self.model), batch):
                    loss_sum, n, metrics = self.objective.loss(self.model, batch)
                total[g] += torch.tensor([loss_sum.item(), n, *(float(metrics[k]) for k in names)],
                                         device=self.acc.device, dtype=torch.float64)
        total = self.acc.reduce(total, "sum")
        self.model.train()
        whole = total.sum(0)
        count = whole[1].clamp(min=1)
        per_task = {f"loss_{task}": (total[t, 0] / total[t, 1]).item()
                    for t, task in enumerate(tasks) if total[t, 1] > 0}
        means = {k: (whole[2 + i] / count).item() for i, k in enumerate(names)}
        return {"loss": (whole[0] / count).item(), **self.objective.report(means), **per_task}

    def train_step(self) -> tuple[float, int, int]:
        """One optimizer step; returns (mean loss, its normaliser over the step (label tokens,
        pairs), real tokens). The objective's metric sums over the step (all processes) are left
        in `self.step_metrics`."""
        gas = self.args.gradient_accumulation_steps
        first = self.state.micro_batches_seen
        micro = [{k: v.to(self.acc.device) for k, v in self.stream.get(j).items()}
                 for j in range(first, first + gas)]
        local = torch.tensor(sum(self.objective.count(m) for m in micro), device=self.acc.device)
        step_tokens = int(self.acc.reduce(local, "sum"))
        # gradients are averaged over processes by DDP, so scale by world size
        scale = self.acc.num_processes / max(step_tokens, 1)
        loss_total = 0.0
        names = self.objective.metrics
        metric_sums = [0.0] * len(names)
        unwrapped = self.acc.unwrap_model(self.model)
        # per-step method work before the forward (AdapterMethod.before_step: Dynamic LoRA's rank)
        training_hooks.before_step(unwrapped, self.state.global_step + 1, self.total_steps)
        for i, batch in enumerate(micro):
            # a stage may run a micro-batch as parts, one forward and backward each (Objective.split)
            with self.acc.autocast(), training_hooks.batch_context(unwrapped, batch):
                parts = self.objective.parts(self.model, batch)
            for j, part in enumerate(parts):
                last = i == gas - 1 and j == len(parts) - 1
                sync = nullcontext() if last else self.acc.no_sync(self.model)
                # batch_context: a method's per-batch side information (task ids), also for a
                # backward that recomputes the forward (activation checkpointing)
                with sync, self.acc.autocast(), training_hooks.batch_context(unwrapped, part):
                    loss_sum, _, metrics = self.objective.loss(self.model, part)
                    metric_sums = [summed + float(metrics[k]) for summed, k in zip(metric_sums, names)]
                    # a method's regulariser (AdapterMethod.training_loss), once per step, not logged
                    extra = training_hooks.training_loss(unwrapped) if last else None
                    # a method's term from this forward (AdapterMethod.forward_loss: the MoE router's
                    # load balance), averaged over the step's forwards, not logged
                    aux = training_hooks.forward_loss(unwrapped)
                    total = loss_sum * scale + (extra if extra is not None else 0.0)
                    self.acc.backward(total + aux / (gas * len(parts)) if aux is not None else total)
                loss_total += loss_sum.item()
        loss_global = float(self.acc.reduce(torch.tensor(loss_total, device=self.acc.device), "sum"))
        if names:
            reduced = self.acc.reduce(torch.tensor(metric_sums, device=self.acc.device, dtype=torch.float64), "sum")
            metric_sums = reduced.tolist()
        self.step_metrics = dict(zip(names, metric_sums))
        self._check_finite("loss", loss_global / max(step_tokens, 1))
        self.grad_norm = None
        if self.args.max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.grad_norm = float(norm)
            if self.acc.mixed_precision != "fp16":  # fp16's loss scaler skips such steps itself
                self._check_finite("gradient norm", self.grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        # per-step method work that reads the gradients (AdapterMethod.after_step: AdaLoRA's allocator)
        training_hooks.after_step(unwrapped, self.state.global_step + 1, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.micro_batches_seen += gas
        self.state.global_step += 1
        self.state.epoch = self.stream.epoch_of(self.state.micro_batches_seen)
        real = sum(real_tokens(m) for m in micro)
        return loss_global / max(step_tokens, 1), step_tokens, real

    def _check_finite(self, what: str, value: float) -> None:
        """Before the step is applied: a NaN/inf stops the run (errors.TrainingDiverged)."""
        stop.check_finite(what, value, self.state.global_step + 1, self.args.learning_rate,
                          self.last_checkpoint, self.args.overwrite_output_dir)

    def check_weights(self) -> None:
        """Raises errors.TrainingDiverged if a trainable weight is NaN or inf (on every process,
        so that all of them stop)."""
        stop.check_weights(self.acc.unwrap_model(self.model), self.state.global_step,
                           self.args.learning_rate, self.last_checkpoint,
                           self.args.overwrite_output_dir)

    def save_checkpoint(self) -> None:
        """checkpoint-<step>, written by the main process with every process's part: the weights
        gathered whole when they are sharded (FSDP2), each process's RNG states; the data
        position is the step's (TrainerState.micro_batches_seen). A sharded optimizer state is
        written by every process, its own shard (distributed.sharded.save_optimizer_shards)."""
        self.check_weights()
        if self._clock is not None:
            self.state.elapsed_seconds = round(time.perf_counter() - self._clock, 3)
        self.acc.wait_for_everyone()
        model = self.acc.unwrap_model(self.model)
        sharded = is_sharded(model)
        keep = not self.args.save_only_model
        groups = None
        if sharded and keep:  # every process writes its shard into the temporary folder
            step = self.state.global_step
            if self.acc.is_main_process:
                ckpt.begin_checkpoint(self.output_dir, step)
            self.acc.wait_for_everyone()
            groups = ckpt.write_optimizer_shards(self.output_dir, step, model, self.optimizer)
        rng_states = gather_object([ckpt.rng_state()]) if self.acc.num_processes > 1 and keep else None
        with gathered(model):  # every process (a collective); the main one writes
            if self.acc.is_main_process:
                writer = (lambda d: self.setup.save_in_checkpoint(model, d)) \
                    if self.setup.save_in_checkpoint else None
                ckpt.save_checkpoint(self.output_dir, self.state, model, self.optimizer, self.scheduler,
                                     extra_writer=writer, total_limit=self.args.save_total_limit,
                                     weights_only=self.args.save_only_model, optimizer_groups=groups,
                                     rng_states=rng_states)
        self.last_checkpoint = self.output_dir / f"{ckpt.PREFIX}{self.state.global_step}"
        self.acc.wait_for_everyone()

    def _saved_in_output_dir(self) -> bool:
        """This step's checkpoint is in output_dir already (just saved, or the one a finished
        run resumed from): a checkpoint is never written twice."""
        here = self.output_dir / f"{ckpt.PREFIX}{self.state.global_step}"
        return self.last_checkpoint is not None and self.last_checkpoint.resolve() == here.resolve()

    def _stop_if_asked(self, signals: stop.StopSignals, reporter: Reporter) -> None:
        """After a signal: save a checkpoint at this step boundary (unless one was just saved)
        and raise. Every process stops at the same step: the request is shared (any one's
        counts)."""
        asked = signals.received is not None
        if self.acc.num_processes > 1:
            flag = torch.tensor(float(asked), device=self.acc.device)
            asked = bool(self.acc.reduce(flag, "sum") > 0)
        if not asked:
            return
        if not self._saved_in_output_dir():
            self.save_checkpoint()
        reporter.close()
        raise signals.exception(self.last_checkpoint)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the last step, evaluate, checkpoint; returns the metrics.

        Raises errors.TrainingDiverged on a NaN/inf loss or weight, stop.Interrupted (Ctrl-C) or
        stop.Terminated (SIGTERM) after saving a checkpoint, CheckpointError on a full disk."""
        if self._rng_state is not None:  # last, so that nothing before training consumes them
            ckpt.set_rng_state(self._rng_state)
        targets = report_targets(self.args.report_to)
        trackers = []
        if self.acc.is_main_process and any(t != "tensorboard" for t in targets):
            from ..config import SECRET_KEYS

            values = {k: v for k, v in self.cfg.to_dict().items() if k not in SECRET_KEYS}
            trackers = start_trackers([t for t in targets if t != "tensorboard"], self.output_dir,
                                      self.args.run_name, values)
        # the clock of elapsed_time and train_runtime (from here, as transformers' Trainer: with the
        # eval before training); a resumed run's continues from its checkpoint's
        earlier = self.state.elapsed_seconds or 0.0
        self._clock = time.perf_counter() - earlier
        reporter = Reporter(self.output_dir, self.total_steps, self.state.global_step,
                            enabled=self.acc.is_main_process,
                            show_progress=not self.args.disable_tqdm,
                            tensorboard_dir=self._tensorboard_dir(targets), trackers=trackers,
                            elapsed_before=earlier)
        try:
            return self._run(reporter)
        finally:
            reporter.close()

    def _run(self, reporter: Reporter) -> dict:
        args, acc = self.args, self.acc
        has_eval = bool(self.eval_examples)
        results: dict = {}
        if self.resume_from is not None:
            done = "; nothing left to train" if self.state.global_step >= self.total_steps else ""
            reporter.message(f"resumed from {self.resume_from} at step {self.state.global_step}"
                             f"{done}")
        elif has_eval and args.eval_on_start:
            means = self.evaluate()
            results.update(_eval_results(means, "_before"))
            reporter.message(f"eval_loss before training: {_eval_text(means)}")
            reporter.log_eval(0, means["loss"], 0.0, _metrics(means))

        self.model.train()
        reporter.begin()  # the bar, remaining_time and tokens/s count from the first step's start
        window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
        window_metrics: dict[str, float] = {}  # the objective's metric sums (rewards, accuracy)
        start_step, started = self.state.global_step, time.perf_counter()
        # fewer CPU threads while other processes keep this one's cores busy (threads.FreeCores)
        cores = follow_free_cores(args.num_threads, acc.num_processes) if acc.device.type == "cpu" else None
        with stop.StopSignals(self.args.overwrite_output_dir, acc.num_processes) as signals, \
                signals.peers_gone(lambda: self.last_checkpoint), \
                cores or nullcontext():  # peers_gone: a launcher's SIGTERM (torchrun); cores: restored at the end
            while self.state.global_step < self.total_steps:
                loss, tokens, real = self.train_step()
                if cores is not None:
                    cores.update()
                step = self.state.global_step
                window_loss += loss * tokens
                window_tokens += tokens
                window_real += real
                for name, value in self.step_metrics.items():
                    window_metrics[name] = window_metrics.get(name, 0.0) + value
                reporter.step(step)
                if step % args.logging_steps == 0 or step == self.total_steps:
                    seconds = time.perf_counter() - window_start
                    reporter.log_train(step, window_loss / max(window_tokens, 1),
                                       self.scheduler.get_last_lr()[0], self.state.epoch,
                                       self.grad_norm,
                                       acc.num_processes * window_real / max(seconds, 1e-9),
                                       self.objective.report({k: v / max(window_tokens, 1)
                                                              for k, v in window_metrics.items()}))
                    window_loss, window_tokens, window_real, window_metrics = 0.0, 0, 0, {}
                    window_start = time.perf_counter()
                self._stop_if_asked(signals, reporter)  # Ctrl-C / SIGTERM: no eval first
                if (has_eval and args.eval_strategy == "steps" and args.eval_steps
                        and step % args.eval_steps == 0 and step < self.total_steps):
                    means = self.evaluate()
                    reporter.log_eval(step, means["loss"], self.state.epoch, _metrics(means))
                    reporter.message(f"step {step}: eval_loss {_eval_text(means)}")
                if args.save_strategy == "steps" and step % args.save_steps == 0 \
                        and step < self.total_steps:
                    self.save_checkpoint()
                self._stop_if_asked(signals, reporter)  # asked during the eval or the save

        runtime = time.perf_counter() - started  # this run's steps' time
        total_runtime = time.perf_counter() - self._clock  # with the earlier runs' (resumed)
        if has_eval:
            means = self.evaluate()
            results.update(_eval_results(means, ""))
            results.update(self.eval_metrics(means))
            reporter.log_eval(self.state.global_step, means["loss"], self.state.epoch,
                              _metrics(means))
            reporter.message(f"eval_loss after training: {_eval_text(means)}")
            # a method evaluated in several forms (AdapterMethod.after_training: DyLoRA's ranks)
            results.update(training_hooks.after_training(self.acc.unwrap_model(self.model),
                                                         self.evaluate, reporter.message))
        if args.save_strategy == "steps" and not self._saved_in_output_dir():
            self.save_checkpoint()  # the last step is always resumable / inspectable
        reporter.close()
        logged = [e["loss"] for e in _read_train_losses(self.output_dir)] if acc.is_main_process else []
        results.update({
            "train_loss": sum(logged) / len(logged) if logged else None,
            "train_runtime": round(total_runtime, 3),
            "train_steps_per_second": round((self.state.global_step - start_step) / max(runtime, 1e-9), 4),
            "global_step": self.state.global_step,
            "epoch": round(self.state.epoch, 4),
        })
        return results

    def _tensorboard_dir(self, targets: list[str]) -> str | None:
        if "tensorboard" in targets:
            return self.args.logging_dir or str(self.output_dir / "runs")
        return None


def _task_names(cfg, examples: list[dict]) -> list[str]:
    """The task names (dataset: in order) when the examples carry task ids (multitask: true)."""
    if not examples or TASK_ID not in examples[0]:
        return []
    return [n.strip() for n in str(cfg.data.dataset or "").split(",") if n.strip()]


def _metrics(means: dict) -> dict:
    """The eval means besides the loss, named as logged: {"eval_accuracy": ...}."""
    return {f"eval_{k}": v for k, v in means.items() if k != "loss"}


def _eval_results(means: dict, suffix: str) -> dict:
    return {f"eval_loss{suffix}": means["loss"],
            **{f"{k}{suffix}": v for k, v in _metrics(means).items()}}


def _eval_text(means: dict) -> str:
    """"0.6931" for a loss alone (sft's log lines), "0.6931, eval_accuracy 0.5000" with metrics."""
    return ", ".join([f"{means['loss']:.4f}", *(f"{k} {v:.4f}" for k, v in _metrics(means).items())])


def _read_train_losses(output_dir: Path) -> list[dict]:

    return [e for e in read_log(output_dir) if "loss" in e]
