"""Progress when stderr is not a terminal: plain lines with step and ETA, rate-limited."""

import io
import sys

from ptqd.progress import LineProgress, progress_bar


def test_lines_carry_stage_step_and_eta():
    out = io.StringIO()
    with LineProgress(4, "build", stream=out, interval=0) as bar:
        bar.set_postfix_str("w8a8")
        bar.update()
        bar.set_postfix_str("w4a8")
    lines = out.getvalue().splitlines()
    assert lines[0] == "ptqd: build 0/4 (w8a8) 0s", lines
    assert lines[1].startswith("ptqd: build 1/4 (w8a8) ") and ", ETA " in lines[1]
    assert lines[-1].startswith("ptqd: build 1/4 done in ")


def test_lines_are_rate_limited():
    out = io.StringIO()
    with LineProgress(1000, "calibrate", stream=out, interval=3600) as bar:
        for _ in range(1000):
            bar.update()
    assert out.getvalue() == ""  # nothing before the first interval: quick work stays quiet


def test_not_a_terminal_gets_lines_and_false_gets_nothing(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(3, "x"), LineProgress)
    bar = progress_bar(3, "x", enabled=False)
    bar.update()
    bar.close()
    assert sys.stderr.getvalue() == ""
