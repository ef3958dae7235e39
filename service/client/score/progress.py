"""`cnnserve score`'s progress bar (or lines, off a terminal) and the run's summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A bar redrawn on a TTY (at most 10 times a second), else one line every `interval_s`."""

    def __init__(self, total: int, *, quiet: bool, interval_s: float, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.interval_s = 0.1 if self.tty else interval_s
        self.start = time.monotonic()
        self._last = self.start

    def update(self, done: int, failed: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        share = done / self.total if self.total else 1.0
        text = f"{done}/{self.total} {share:4.0%} {rate:.1f} img/s ETA {eta} failed {failed}"
        if self.tty:
            width = 30
            filled = int(width * share)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
        else:
            self.stream.write(f"score: {text}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0
    scored: int = 0
    failed: int = 0
    earlier_failed: int = 0
    retries: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return (self.scored + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        text = (
            f"scored {self.scored}, failed {self.failed}, skipped {self.skipped} (already in the output), "
            f"{self.rate:.1f} img/s over {self.elapsed_s:.1f} s"
        )
        if self.retries or self.reconnects:
            text += f"; {self.retries} retries, {self.reconnects} reconnects"
        if self.earlier_failed:
            text += f"; {self.earlier_failed} failed in an earlier run (--retry-failed to retry)"
        return text
