"""A run's progress as the page shows it, read from the files the run writes: trainer_log.jsonl
(train/reporting.py) for step, loss, lr, tokens/s and ETA, and the captured console output for
the log tail and the CLI's one-line errors. No gradio here."""

from __future__ import annotations

from pathlib import Path

from ..train.plot import smooth
from ..train.reporting import read_log
from .i18n import text

ERROR_PREFIX = "tuneforge: error:"


def progress_line(output_dir: str | Path | None, lang: str = "en") -> str:
    """"step 2/10 · loss 1.2345 · lr 1.00e-04 · 812 tokens/s · ETA 0:00:12" from the newest
    training entry of the run's trainer_log.jsonl; "" before the first one."""
    if not output_dir:
        return ""
    entries = [e for e in read_log(output_dir) if "loss" in e]
    if not entries:
        return ""
    last = entries[-1]
    return text("msg.progress", lang, step=last.get("current_steps", "?"), total=last.get("total_steps", "?"),
                loss=f"{last['loss']:.4f}", lr=f"{last.get('lr', 0):.2e}",
                tps=f"{last.get('tokens_per_second', 0):.0f}", eta=last.get("remaining_time", "0:00:00"))


def loss_points(output_dir: str | Path | None, lang: str = "en", key: str = "loss", label: str | None = None):
    """The loss curve as a pandas DataFrame with columns step, loss, series: the raw values
    ("original") and the same smoothing as training_loss.png (train.plot.smooth, "smoothed").
    `label` prefixes the series names (for runs compared on one plot). Empty frame: no points."""
    import pandas as pd

    rows = []
    if output_dir:
        points = [(e["current_steps"], e[key]) for e in read_log(output_dir) if e.get(key) is not None]
        if points:
            steps, values = zip(*points)
            prefix = f"{label}: " if label else ""
            rows += [(s, v, prefix + text("series.original", lang)) for s, v in points]
            rows += [(s, v, prefix + text("series.smoothed", lang)) for s, v in zip(steps, smooth(list(values)))]
    # typed even when empty: the plot takes its axes' kinds (quantitative) from the first frame it gets
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64",
                                                                         "series": "str"})


def log_tail(path: str | Path | None, lines: int = 30) -> str:
    """The last `lines` lines of a captured log; progress-bar redraws (carriage returns) keep
    only their newest state."""
    if not path or not Path(path).is_file():
        return ""
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    kept = [line.rsplit("\r", 1)[-1] for line in raw.splitlines()]
    return "\n".join(line for line in kept[-lines:])


def error_lines(path: str | Path | None) -> list[str]:
    """The CLI's `tuneforge: error: ...` lines in a captured log (a failed run's reason)."""
    if not path or not Path(path).is_file():
        return []
    return [line.strip() for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip().startswith(ERROR_PREFIX)]
