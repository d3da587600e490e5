"""The Reporter's lines and clocks (train/reporting.py): its lines start as the log lines do, a
resumed run's elapsed_time continues from its checkpoint's, and remaining_time's rate counts from
the first step's start (not from before the eval before training). The loop's side of these:
test_resume_faults.py (the clock through a real resume), test_loop.py (the log's fields)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tuneforge.train import reporting
from tuneforge.train.reporting import LOG_FILE, Reporter


def test_timing_continues_a_resume_and_the_rate_starts_with_the_first_step(tmp_path, monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(reporting, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    # resumed at step 1 of 4 from a checkpoint whose run had trained for an hour
    reporter = Reporter(tmp_path, total_steps=4, start_step=1, show_progress=False, elapsed_before=3600.0)
    clock.now += 100  # 100 s before the first step (an eval before training, say)
    reporter.log_eval(1, 0.5, 0.0)
    reporter.begin()
    clock.now += 10  # step 2 took 10 s
    reporter.log_train(2, 0.4, 1e-4, 0.5, None, 123.0)
    before, step = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert before["elapsed_time"] == "1:01:40" and "remaining_time" not in before
    assert step["elapsed_time"] == "1:01:50"  # 3600 + 110 s
    assert step["remaining_time"] == "0:00:20"  # 2 steps left at 10 s each (was 2 x 110 s)


def test_a_message_starts_as_the_log_lines_do(tmp_path, capsys):
    reporter = Reporter(tmp_path, total_steps=2, start_step=0, show_progress=False)
    reporter.message("resumed from x at step 1")
    assert capsys.readouterr().out == "[tuneforge] resumed from x at step 1\n"
    Reporter(tmp_path, total_steps=2, start_step=0, enabled=False).message("not on this process")
    assert capsys.readouterr().out == ""
