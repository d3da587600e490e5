"""The Reporter's lines (train/reporting.py): they start as the log lines do."""

from __future__ import annotations

from tuneforge.train.reporting import Reporter


def test_a_message_starts_as_the_log_lines_do(tmp_path, capsys):
    reporter = Reporter(tmp_path, total_steps=2, start_step=0, show_progress=False)
    reporter.message("resumed from x at step 1")
    assert capsys.readouterr().out == "[tuneforge] resumed from x at step 1\n"
    Reporter(tmp_path, total_steps=2, start_step=0, enabled=False).message("not on this process")
    assert capsys.readouterr().out == ""
