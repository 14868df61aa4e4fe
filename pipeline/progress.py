"""Progress that fits where it goes: tqdm bars on a terminal, periodic log lines in a log file or CI.

A bar redrawn with carriage returns turns into one unreadable line when stderr is a file or a
pipe, so there `tqdm()` returns a stand-in that logs the count, rate and postfix every
`LOG_EVERY` seconds and once at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("pipeline.progress")

LOG_EVERY = 30.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def tqdm(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any):
    """`tqdm.auto.tqdm(...)` on a terminal, else a `LogProgress` with the same calls."""
    if disable or _is_terminal(sys.stderr):
        from tqdm.auto import tqdm as bar

        return bar(iterable, disable=disable, **kwargs)
    return LogProgress(iterable, total=kwargs.get("total"), desc=kwargs.get("desc", ""), unit=kwargs.get("unit", "it"))


class LogProgress:
    """The part of tqdm's interface the stages use (iterate, update, set_postfix_str, close), as log lines."""

    def __init__(
        self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it", every: float | None = None
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.every = LOG_EVERY if every is None else every
        self.n = 0
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            log.info("%s", self.line())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:,.1f} {self.unit}/s" if elapsed > 0 and self.n else ""
        return f"{self.desc}: {done}{pct} in {elapsed:.1f} s{rate}" + (f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            log.info("%s", self.line())
