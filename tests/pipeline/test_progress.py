"""Progress: a tqdm bar on a terminal, log lines when stderr is a file or a pipe."""

from __future__ import annotations

import io
import logging

from pipeline import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_gives_log_lines(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    bar = progress.tqdm(total=10, desc="extract bert/train", unit="row")
    assert isinstance(bar, progress.LogProgress)
    bar.tokens = 0  # the stages hang their own counters on the bar
    bar.update(4)
    bar.set_postfix_str("1,000 tok/s")
    bar.update(6)
    bar.close()
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("extract bert/train: 4/10 row (40%)")
    assert lines[1].startswith("extract bert/train: 10/10 row (100%)") and lines[1].endswith(", 1,000 tok/s")
    assert "\r" not in "".join(lines)


def test_iterating_logs_at_the_interval_and_at_the_end(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    assert list(progress.tqdm(range(5), desc="score", unit="model")) == list(range(5))
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["score: 5/5 model (100%)"]  # default interval: end only


def test_terminal_and_disabled_give_tqdm(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr("sys.stderr", _Tty())
    assert isinstance(progress.tqdm(total=3, desc="x"), tqdm)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(progress.tqdm(total=3, desc="x", disable=True), tqdm)
