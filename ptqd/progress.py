"""Progress of long work on stderr: a tqdm bar on a terminal; where stderr is a file or a pipe (a CI log,
``ptqd compile ... 2> log``), plain lines, one every few seconds at most, with the stage, the step and an
ETA, so that a log shows the work moving instead of nothing for half an hour."""

from __future__ import annotations

import sys
import time

LINE_INTERVAL_S = 5.0  # at most one progress line this often when stderr is not a terminal


class LineProgress:
    """The part of tqdm's interface ptqd uses (``update``, ``set_postfix_str``, a context manager), as
    plain lines: ``ptqd: calibrate 12/40 (observing 283 layers) 1m05s, ETA 2m50s``. The first line comes
    after ``interval`` seconds, so short work (and a one-line error) prints nothing else."""

    def __init__(self, total: int, desc: str, stream=None, interval: float = LINE_INTERVAL_S):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.stream, self.interval = stream or sys.stderr, interval
        self.t0 = time.monotonic()
        self._last = self.t0  # time of the last line: work shorter than ``interval`` prints nothing

    def _line(self, final: bool = False) -> None:
        el = time.monotonic() - self.t0
        what = f" ({self.postfix})" if self.postfix else ""
        if final:
            text = f"ptqd: {self.desc} {self.n}/{self.total} done in {_dur(el)}"
        else:
            eta = f", ETA {_dur(el / self.n * (self.total - self.n))}" if 0 < self.n < self.total else ""
            text = f"ptqd: {self.desc} {self.n}/{self.total}{what} {_dur(el)}{eta}"
        print(text, file=self.stream, flush=True)
        self._last = time.monotonic()

    def _maybe(self) -> None:
        if time.monotonic() - self._last >= self.interval:
            self._line()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s
        self._maybe()

    def close(self) -> None:
        if self._last > self.t0 or time.monotonic() - self.t0 >= self.interval:  # quiet work stays quiet
            self._line(final=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    """``enabled``: True, a bar; False, nothing; None (the default), a bar on a terminal and plain lines
    elsewhere."""
    if enabled is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return LineProgress(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled if enabled is not None else False,
                bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix}")
