"""Stopping a run cleanly. Ctrl-C (SIGINT) or SIGTERM: the current optimizer step finishes,
a checkpoint is saved at that step boundary and the run ends with one line saying how to
resume (a second signal aborts at once; what is on disk then is as after kill -9, which the
next run copes with). In a run of several processes a SIGTERM usually comes from the launcher
(torchrun stops every process when one of them fails): the step's checkpoint is saved only if
every process gets to its end, and when a collective fails because another process is gone, the
run stops with one line naming the last complete checkpoint, which is what a resume uses. A
non-finite loss or weight: the run stops before the step is applied or saved, so no checkpoint
or final output ever holds NaN or inf."""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager

import torch

from ..errors import TrainingDiverged

log = logging.getLogger("tuneforge")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was saved at the last step boundary (the CLI exits with 130)."""


class Terminated(SystemExit):
    """SIGTERM: a checkpoint was saved at the last step boundary; exits with 143 (128 + 15)."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


class StopSignals:
    """While active (a `with` block in the main thread), SIGINT and SIGTERM only ask the loop
    to stop at the next step boundary; a second one stops at once. Elsewhere (a worker
    thread) it does nothing, and signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, overwrite: bool = False, processes: int = 1):
        """overwrite: the run has overwrite_output_dir, so the same command would start over;
        processes: how many processes train together (a launcher's SIGTERM, see `peers_gone`)."""
        self.received: int | None = None
        self.overwrite = overwrite
        self.processes = processes
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: stop now, save nothing more
            log.warning("%s again: stopping at once without saving; the same command run "
                        "again continues from the newest checkpoint, if any",
                        signal.Signals(signum).name)
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        self.received = signum
        if signum == signal.SIGTERM and self.processes > 1:
            log.warning("SIGTERM: the launcher is stopping the run (torchrun stops every process when "
                        "one of them fails, or when it is stopped itself); a checkpoint is saved at the "
                        "end of this step only if every process gets there, else a resume uses the last "
                        "complete checkpoint")
            return
        log.warning("%s: finishing the current step to save a checkpoint (send it again to "
                    "stop at once)", signal.Signals(signum).name)

    def exception(self, checkpoint) -> BaseException:
        """What the run raises after saving `checkpoint`, with the line saying how to resume."""
        name = signal.Signals(self.received).name
        log.warning("stopped by %s; saved %s; %s", name, checkpoint, resume_advice(self.overwrite))
        return Interrupted() if self.received == signal.SIGINT else Terminated()

    @contextmanager
    def peers_gone(self, last_checkpoint):
        """Around the steps of a run of several processes: a collective that fails (torch.distributed's
        RuntimeError) after a signal came means another process is gone, so nothing more can be
        saved; the run stops (Terminated / Interrupted) with one line naming the last complete
        checkpoint, `last_checkpoint()`, instead of the collective's traceback. No signal, or one
        process: the error passes unchanged."""
        try:
            yield
        except RuntimeError as exc:
            if self.received is None or self.processes < 2:
                raise
            name, checkpoint = signal.Signals(self.received).name, last_checkpoint()
            kept = (f"the last complete checkpoint is {checkpoint}; {resume_advice(self.overwrite)}"
                    if checkpoint else "no checkpoint was saved yet: the same command starts over")
            log.warning("stopped by %s: another process is gone (%s), so this step's checkpoint cannot be "
                        "saved; %s", name, _first_line(exc), kept)
            raise (Interrupted() if self.received == signal.SIGINT else Terminated()) from None


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """'RuntimeError: <the message's first sentence>' (gloo's go on with advice for its developers)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].split('. ')[0][:limit]}" if text else type(exc).__name__


def resume_advice(overwrite: bool) -> str:
    """How to continue from the newest checkpoint: the same command, or, when the run has
    overwrite_output_dir (which would start over and delete the checkpoints), the same command
    with overwrite_output_dir=false."""
    if not overwrite:
        return "to resume, run the same command again" + _command()
    return ("to resume, run the same command with overwrite_output_dir=false (with true it starts "
            "over and deletes the checkpoints)" + _command("overwrite_output_dir=false"))


def _command(*extra: str) -> str:
    """': tuneforge train cfg.yaml [extra ...]' when this process is the CLI, else ''."""
    argv = sys.argv
    if len(argv) > 1 and argv[1] == "train" and \
            os.path.basename(argv[0]) in ("tuneforge", "__main__.py"):
        return ": " + shlex.join(["tuneforge", *argv[1:], *extra])
    return ""


def check_finite(what: str, value: float, step: int, learning_rate: float,
                 last_checkpoint, overwrite: bool = False) -> None:
    """Raises TrainingDiverged when `what` (the loss, the gradient norm) of `step` is NaN or
    inf; called before the step is applied."""
    if math.isfinite(value):
        return
    raise TrainingDiverged(f"training diverged: the {what} is {value} at step {step}; "
                           f"{_aftermath(learning_rate, last_checkpoint, overwrite)}")


def check_weights(model, step: int, learning_rate: float, last_checkpoint,
                  overwrite: bool = False) -> None:
    """Raises TrainingDiverged when a trainable weight is NaN or inf (before saving it)."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise TrainingDiverged(f"training diverged: {bad:,} values of '{name}' are NaN or "
                                   f"inf after step {step}; "
                                   f"{_aftermath(learning_rate, last_checkpoint, overwrite)}")


def _aftermath(learning_rate: float, last_checkpoint, overwrite: bool = False) -> str:
    if not last_checkpoint:
        return (f"nothing was saved for it and no checkpoint was written; lower learning_rate "
                f"(now {learning_rate:g}) and start over with overwrite_output_dir: true")
    return (f"nothing was saved for it and the last good checkpoint, {last_checkpoint}, is kept; "
            f"lower learning_rate (now {learning_rate:g}) and start over with "
            "overwrite_output_dir: true, or run again" + (" with overwrite_output_dir=false" if overwrite
                                                          else "") +
            " to continue from that checkpoint at the lower rate")
