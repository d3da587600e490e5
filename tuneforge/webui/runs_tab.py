"""The Runs tab: the runs under an output root (folders with a trainer_log.jsonl), each with its
last step, final loss, eval loss and train_results.json, and the loss curves of one run or two
compared on one plot (raw and smoothed, as training_loss.png)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from ..train.reporting import LOG_FILE, read_log
from .i18n import text
from .labels import Labels
from .progress import loss_points

COLUMNS = ["run", "steps", "loss", "eval_loss", "results"]


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under `root` (depth 3), newest first; checkpoints and the page's own files are skipped."""
    root = Path(root or "saves").expanduser()
    if not root.is_dir():
        return []
    found = {p.parent for pattern in (LOG_FILE, f"*/{LOG_FILE}", f"*/*/{LOG_FILE}", f"*/*/*/{LOG_FILE}")
             for p in root.glob(pattern) if "checkpoint-" not in str(p.parent)}
    return sorted(found, key=lambda p: (p / LOG_FILE).stat().st_mtime, reverse=True)


def summary(run: Path) -> list:
    """[run folder, last step/total, last train loss, last eval loss, train_results.json in one line]."""
    entries = read_log(run)
    last = next((e for e in reversed(entries) if "loss" in e), {})
    last_eval = next((e for e in reversed(entries) if "eval_loss" in e), {})
    results = run / "train_results.json"
    try:
        extra = json.dumps(json.loads(results.read_text()), ensure_ascii=False) if results.is_file() else ""
    except (OSError, ValueError):
        extra = ""
    step = f"{last.get('current_steps', '')}/{last.get('total_steps', '')}" if last else ""
    return [str(run), step, last.get("loss"), last_eval.get("eval_loss"), extra]


def compared(run_a: str, run_b: str, lang: str):
    """The loss points of one or two runs on one frame, each series named after its run."""
    import pandas as pd

    frames = [loss_points(run, lang, label=Path(run).name) for run in (run_a, run_b) if run]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else None


def build(labels: Labels, lang_box) -> None:
    with gr.Row():
        root = labels.add(gr.Textbox(value="saves", elem_id="tf-runs-root", scale=3, **labels.field("runs_root")),
                          "runs_root")
        refresh = labels.add(gr.Button(text("btn.refresh", labels.lang), elem_id="tf-runs-refresh"), "btn.refresh",
                             "button")
    status = labels.add(gr.Textbox(interactive=False, elem_id="tf-runs-status", **labels.field("status")), "status")
    table = labels.add(gr.Dataframe(headers=COLUMNS, elem_id="tf-runs-table", wrap=True,
                                    label=text("runs_table", labels.lang)), "runs_table")
    with gr.Row():
        run_a = labels.add(gr.Dropdown(choices=[], elem_id="tf-runs-a", **labels.field("run_a")), "run_a")
        run_b = labels.add(gr.Dropdown(choices=[], elem_id="tf-runs-b", **labels.field("run_b")), "run_b")
        compare = labels.add(gr.Button(text("btn.compare", labels.lang), elem_id="tf-runs-compare"), "btn.compare",
                             "button")
    plot = labels.add(gr.LinePlot(None, x="step", y="loss", color="series", elem_id="tf-runs-plot", height=320,
                                  label=text("loss_plot", labels.lang)), "loss_plot")

    def on_refresh(lang, folder):
        runs = find_runs(folder)
        names = [str(r) for r in runs]
        rows = [summary(r) for r in runs]
        return (text("msg.runs", lang, count=len(runs), root=folder), rows,
                gr.update(choices=names, value=names[0] if names else None),
                gr.update(choices=[""] + names, value=""))

    def on_compare(lang, a, b):
        frame = compared(a, b, lang)
        return gr.update() if frame is None else frame

    refresh.click(on_refresh, [lang_box, root], [status, table, run_a, run_b])
    compare.click(on_compare, [lang_box, run_a, run_b], [plot])
