"""Progress of long work that reads right wherever stderr goes: a tqdm bar on a terminal, and plain
lines at most every ``every`` seconds elsewhere (a log file, nohup, CI), each with the stage, step /
total, elapsed and estimated remaining time, so a log never goes silent for a whole prune."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Lines:
    """tqdm's small interface (iterate, update, set_postfix_str, close) printing plain lines."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, every: float, file):
        self.iterable, self.desc, self.unit, self.every, self.file = iterable, desc, unit, every, file
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = 0
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.closed = False
        self.shown = -1  # the step count of the last line printed

    def __iter__(self) -> Iterator:
        for x in self.iterable:
            yield x
            self.update()
        self.close()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> str:
        el = time.monotonic() - self.t0
        if self.total:
            done = f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})"
            left = f", about {_clock(el / self.n * (self.total - self.n))} left" if 0 < self.n < self.total else ""
        else:
            done, left = f"{self.n} {self.unit}", ""
        post = f"  {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}, {_clock(el)} elapsed{left}{post}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print()

    def _print(self) -> None:
        self.shown = self.n
        print(self._line(), file=self.file, flush=True)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # short stages stay quiet, and the last step is not printed twice
            if time.monotonic() - self.t0 >= self.every and self.shown != self.n:
                self._print()


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    every: float = 10.0,
    leave: bool = True,
):
    """A bar on a terminal, periodic plain lines otherwise, nothing when ``enabled`` is False."""
    file = sys.stderr
    if enabled and file.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, mininterval=0.5, file=file)
    return Lines(iterable, total, desc, unit, every if enabled else float("inf"), file)
