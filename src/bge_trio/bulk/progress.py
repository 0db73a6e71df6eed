"""Progress of a bulk job: a live line on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("bge_trio.bulk")


class Progress:
    """Texts done of the total, tokens per second and the time left."""

    def __init__(
        self, total: int, done: int = 0, stream: TextIO | None = None, every_s: float = 10.0
    ) -> None:
        self.total = total
        self.done = done
        self._started_with = done
        self._tokens = 0
        self._start = time.monotonic()
        self._stream = stream if stream is not None else sys.stderr
        self._live = self._stream.isatty()
        self._every_s = every_s
        self._last = -float("inf")

    def begin(self) -> None:
        """Count rates from now (after the model has loaded)."""
        self._start = time.monotonic()

    def advance(self, texts: int, tokens: int) -> None:
        self.done += texts
        self._tokens += tokens
        now = time.monotonic()
        if self._live:
            self._stream.write("\r" + self.line() + " " * 4)
            self._stream.flush()
        elif now - self._last >= self._every_s or self.done >= self.total:
            self._last = now
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.done - self._started_with) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else _duration(left)
        return (
            f"{self.done}/{self.total} texts ({100 * self.done / max(self.total, 1):.0f} %), "
            f"{self._tokens / elapsed:.0f} tokens/s, ETA {eta}"
        )

    def finish(self) -> None:
        if self._live:
            self._stream.write("\n")
            self._stream.flush()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
