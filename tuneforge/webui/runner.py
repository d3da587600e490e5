"""Training started from the page: a subprocess running the same CLI (`python -m tuneforge train
<saved yaml>`) with its console output captured in a file, so a page run equals a CLI run.
Stop sends SIGINT, which the CLI handles as Ctrl-C (train/stop.py): the current step finishes,
a checkpoint is saved and the run exits with 130; running the same YAML again resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import command

RUN_FOLDER = ".webui"  # beside the output dir: <parent>/.webui/<output dir name>/{train.yaml, train.log}


def run_files(output_dir: str | Path) -> tuple[Path, Path]:
    """Where a page run of `output_dir` keeps its YAML and console log: outside the output dir,
    which a new run needs empty (train/resume.py), and found again by the Runs tab."""
    out = Path(output_dir).expanduser()
    folder = out.parent / RUN_FOLDER / out.name
    return folder / "train.yaml", folder / "train.log"


@dataclass
class TrainRun:
    """One subprocess; `state` is "running", "finished", "stopped" or "failed"."""

    values: dict
    yaml_path: Path
    log_path: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    devices: int = 1

    @property
    def output_dir(self) -> str:
        return str(self.values.get("output_dir") or "")

    @property
    def command(self) -> str:
        return command.command_line(self.yaml_path, self.devices)

    @property
    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if code == 0:
            return "finished"
        if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
            return "stopped"
        return "failed"

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        """SIGINT, as Ctrl-C in a terminal: a checkpoint at the next step boundary, then exit."""
        if self.process.poll() is None:
            self.stop_requested = True
            self.process.send_signal(signal.SIGINT)


class Runner:
    """At most one training at a time (as LlamaBoard); the page polls `current`."""

    def __init__(self) -> None:
        self.current: TrainRun | None = None

    def busy(self) -> bool:
        return self.current is not None and self.current.state == "running"

    def start(self, values: dict, devices=1) -> TrainRun:
        """Save `values` as YAML next to the output dir and start `tuneforge train` on it, on
        `devices` processes (command.launch_env: FORCE_TORCHRUN=1 NPROC_PER_NODE=N for N > 1).
        Raises RuntimeError when a run is going on, OSError when the files cannot be written,
        ConfigError for a device count that is not a whole number of 1 or more."""
        if self.busy():
            raise RuntimeError("a training run is going on")
        launch_env = command.launch_env(devices)
        yaml_path, log_path = run_files(values["output_dir"])
        command.save(values, yaml_path)
        log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **launch_env}
        try:
            process = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(yaml_path)],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        finally:
            log.close()
        self.current = TrainRun(values, yaml_path, log_path, process, devices=command.device_number(devices))
        return self.current

    def stop(self) -> bool:
        if not self.busy():
            return False
        self.current.stop()
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop a run going on (the page's server is closing) and wait for its checkpoint."""
        if self.busy():
            self.current.stop()
            try:
                self.current.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.current.process.kill()
