"""Progress that reads right in a log file: plain lines with stage, step / total, elapsed, remaining."""

import io
import re

from sparsamba import progress as P


def test_lines_when_stderr_is_not_a_terminal(monkeypatch):
    err = io.StringIO()  # not a tty, as a log file or CI is
    monkeypatch.setattr(P.sys, "stderr", err)
    clock = iter(range(0, 1000, 4))  # each look at the clock is 4 s later
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    bar = P.progress(range(10), desc="learn", unit="steps", every=10)
    for i in bar:
        if i == 5:
            bar.set_postfix_str("expected sparsity 0.31 → 0.500")
    lines = err.getvalue().splitlines()
    assert lines, "nothing was printed for a stage of many seconds"
    assert re.fullmatch(r"learn: \d+/10 steps \(\d+%\), \d+:\d\d elapsed, about \d+:\d\d left", lines[0])
    assert lines[-1].startswith("learn: 10/10 steps (100%)") and lines[-1].endswith("→ 0.500")
    assert "left" not in lines[-1]


def test_quiet_when_disabled_or_short(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(P.sys, "stderr", err)
    list(P.progress(range(100), desc="x", enabled=False))
    list(P.progress(range(100), desc="y"))  # done in far less than 10 s
    assert err.getvalue() == ""


def test_the_last_step_is_printed_once(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(P.sys, "stderr", err)
    clock = iter(range(0, 1000, 20))  # every step is a line
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    list(P.progress(range(3), desc="prune", unit="blocks", every=10))
    lines = err.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["prune: 1/3 blocks (33%)", "prune: 2/3 blocks (67%)", "prune: 3/3 blocks (100%)"]
