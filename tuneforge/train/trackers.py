"""Experiment trackers (`report_to`, `run_name`): accelerate's tracker classes for wandb, mlflow
and swanlab, as LLaMA-Factory reaches them through transformers; TensorBoard stays the Reporter's
own writer (reporting.py). Each tracker needs its own package (an optional extra: `pip install
wandb`); offline modes (WANDB_MODE=offline, a file: MLFLOW_TRACKING_URI, SWANLAB_MODE=local) work
without network.

`report_to` is `none`, `all` (TensorBoard and every tracker whose package is installed, as
transformers reads `all`), or a comma list of tracker names. The project is WANDB_PROJECT /
MLFLOW_EXPERIMENT_NAME / SWANLAB_PROJECT when set, else "tuneforge"; the run is `run_name`, else
the output folder's name."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab")
_PACKAGE = {"wandb": "wandb", "mlflow": "mlflow", "swanlab": "swanlab", "tensorboard": "tensorboard"}
_PROJECT_ENV = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME", "swanlab": "SWANLAB_PROJECT"}


def report_targets(report_to: str | list | None) -> list[str]:
    """The tracker names `report_to` asks for, in TRACKERS order. Raises ConfigError for a name
    that is not a tracker, or one whose package is not installed."""
    names = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "none").split(",")
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if not names or names == ["none"]:
        return []
    if "all" in names:
        return [t for t in TRACKERS if importlib.util.find_spec(_PACKAGE[t]) is not None]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"config key 'report_to' must be none, all or a comma list of {', '.join(TRACKERS)}; "
                          f"got '{unknown[0]}'")
    for name in names:
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise ConfigError(f"report_to: {name} needs the {_PACKAGE[name]} package: pip install {_PACKAGE[name]} "
                              f"(or leave {name} out of report_to)")
    return [t for t in TRACKERS if t in names]


def start_trackers(names: list[str], output_dir: Path, run_name: str | None, config: dict) -> list:
    """Started accelerate trackers for `names` (TensorBoard excluded: the Reporter writes it), each
    with the run's config stored. Call on the main process only."""
    from accelerate.tracking import MLflowTracker, SwanLabTracker, WandBTracker

    run = run_name or Path(output_dir).resolve().name
    started = []
    for name in names:
        project = os.environ.get(_PROJECT_ENV.get(name, ""), "") or "tuneforge"
        if name == "wandb":
            tracker = WandBTracker(project, name=run, dir=str(output_dir))
        elif name == "mlflow":
            tracker = MLflowTracker(experiment_name=project, run_name=run)
        elif name == "swanlab":
            tracker = SwanLabTracker(project, experiment_name=run, logdir=str(Path(output_dir) / "swanlog"))
        else:
            continue
        tracker.start()
        tracker.store_init_configuration(_flat(config))
        started.append(tracker)
    return started


def _flat(config: dict) -> dict:
    """Values trackers store: numbers, strings, booleans and None; anything else as its text."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}
