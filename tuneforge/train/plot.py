"""training_loss.png: the raw loss and an exponentially smoothed curve; the same for the eval
loss and for a stage's own metrics (Stage.plot: training_rewards_accuracies.png, ...)."""

from __future__ import annotations

import math
from pathlib import Path

from .reporting import read_log


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """EMA with a bias correction, so the curve starts at the first value; the weight grows
    with the number of points (as TensorBoard's slider would be set by hand)."""
    if not values:
        return []
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], 0.0
    for i, value in enumerate(values, start=1):
        last = weight * last + (1 - weight) * value
        out.append(last / (1 - weight ** i) if weight > 0 else value)
    return out


def plot_loss(output_dir: str | Path, metrics: tuple[str, ...] = ()) -> list[Path]:
    """One figure per key of trainer_log.jsonl that has values: the loss, the eval loss and each of
    `metrics` and its eval_ counterpart, as training_<key>.png ('/' becomes '_'). Returns the files
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(output_dir)
    written = []
    keys = ["loss", "eval_loss", *(k for m in metrics for k in (m, f"eval_{m}"))]
    for key in dict.fromkeys(keys):
        name = f"training_{key.replace('/', '_')}.png"
        points = [(e["current_steps"], e[key]) for e in entries if e.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        if len(values) > 1:
            ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {Path(output_dir).name}")
        ax.legend()
        path = Path(output_dir) / name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
