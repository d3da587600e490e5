"""Where training progress goes: a progress bar, trainer_log.jsonl, TensorBoard, and the
experiment trackers of `report_to` (wandb, mlflow, swanlab: trackers.py)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .outputs import atomic_write_text

LOG_FILE = "trainer_log.jsonl"
# the start of every line tuneforge prints while working: the CLI's log format (cli._quiet_libraries)
LINE_PREFIX = "[tuneforge] "


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_log(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the tail of a killed run's last line
    return entries


def _six(value: float) -> float:
    """A logged value to 6 decimals; a negative zero (a loss of -1e-9 rounded) is logged as 0.0."""
    return round(value, 6) + 0.0


class Reporter:
    """One object the loop talks to; each sink is optional."""

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int,
                 enabled: bool = True, show_progress: bool = True, tensorboard_dir: str | None = None,
                 trackers: list | None = None, elapsed_before: float = 0.0):
        """`elapsed_before`: seconds of training before this run (a resumed run's checkpoint's),
        added to elapsed_time; remaining_time comes from this run's own rate."""
        self.output_dir = Path(output_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = enabled  # False on non-main processes
        self.started = time.perf_counter()
        self.elapsed_before = elapsed_before
        self.stepping_since: float | None = None  # when this run's first step started (`begin`)
        self.show_progress = show_progress
        self.bar = None
        self.writer = None
        self.trackers = list(trackers or [])  # started accelerate trackers (trackers.start_trackers)
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_log_after(start_step)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=start_step or None)

    def begin(self) -> None:
        """The first step starts now: remaining_time's rate and the progress bar (shown from here)
        count from this moment, not from before the eval before training."""
        self.stepping_since = time.perf_counter()
        if self.enabled and self.show_progress and self.bar is None:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", dynamic_ncols=True)
            # log lines (a signal's warning, a checkpoint's) go above the bar, not glued to its line
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()

    def _truncate_log_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so drop the old ones."""
        path = self.output_dir / LOG_FILE
        kept = [e for e in read_log(self.output_dir) if e.get("current_steps", 0) <= step]
        if path.exists() or kept:  # whole or not at all: a kill here keeps the old log
            atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))

    def _timing(self, step: int) -> dict:
        now = time.perf_counter()
        timing = {"elapsed_time": _fmt_seconds(self.elapsed_before + now - self.started)}
        done = step - self.start_step
        if done > 0:  # before the first step (the eval before training) there is no rate yet
            stepping = now - (self.stepping_since or self.started)  # this run's steps (and evals) only
            timing["remaining_time"] = _fmt_seconds(stepping / done * (self.total_steps - step))
        return timing

    def _write(self, entry: dict) -> None:
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log_train(self, step: int, loss: float, lr: float, epoch: float, grad_norm: float | None,
                  tokens_per_second: float, metrics: dict[str, float] | None = None) -> None:
        """`metrics`: the objective's own means over the logging window, by name, e.g.
        {"rewards/margins": 0.3} (logged beside the loss, as TRL names them)."""
        if not self.enabled:
            return
        extra = {name: _six(value) for name, value in (metrics or {}).items()}
        entry = {"current_steps": step, "total_steps": self.total_steps, "loss": _six(loss),
                 **extra, "lr": lr, "epoch": round(epoch, 4),
                 "percentage": round(100 * step / self.total_steps, 2),
                 "grad_norm": None if grad_norm is None else _six(grad_norm),
                 "tokens_per_second": round(tokens_per_second, 2), **self._timing(step)}
        self._write(entry)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}")
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/learning_rate", lr, step)
            self.writer.add_scalar("train/tokens_per_second", tokens_per_second, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, step)
            for name, value in extra.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        self._track({"train/loss": loss, "train/learning_rate": lr, "train/tokens_per_second": tokens_per_second,
                     **({"train/grad_norm": grad_norm} if grad_norm is not None else {}),
                     **{f"train/{k}": v for k, v in extra.items()}}, step)

    def log_eval(self, step: int, eval_loss: float, epoch: float,
                 metrics: dict[str, float] | None = None) -> None:
        """`metrics`: further eval means by logged name, e.g. {"eval_accuracy": 0.75}."""
        if not self.enabled:
            return
        extra = {name: _six(value) for name, value in (metrics or {}).items()}
        self._write({"current_steps": step, "total_steps": self.total_steps,
                     "eval_loss": _six(eval_loss), **extra, "epoch": round(epoch, 4),
                     "percentage": round(100 * step / self.total_steps, 2), **self._timing(step)})
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", eval_loss, step)
            for name, value in extra.items():
                self.writer.add_scalar(f"eval/{name.removeprefix('eval_')}", value, step)
        self._track({"eval/loss": eval_loss, **{f"eval/{k.removeprefix('eval_')}": v for k, v in extra.items()}}, step)

    def _track(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def message(self, text: str) -> None:
        """One line on stdout ("resumed from ...", "eval_loss after training: ..."), starting with
        LINE_PREFIX like the log lines, above the progress bar; flushed, so that it keeps its place
        among the log lines (stderr) when stdout is a pipe."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(LINE_PREFIX + text)
            sys.stdout.flush()

    def close(self) -> None:
        """Close the bar, the TensorBoard writer and the trackers (again: nothing)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
