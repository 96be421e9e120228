"""Progress over modules on stderr, and the peak memory of the process, for the ``loralego`` command.

No dependency: a ``\\r``-redrawn line on a terminal; in a log (stderr not a terminal) a plain line now and
then, only once a merge has run long enough to need one. Short merges print nothing extra either way.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, TextIO

from .errors import one_line

BAR_WIDTH = 30


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Progress:
    """Call once per merged module (an ``on_module`` callback of the pipeline); ``close()`` at the end.

    On a terminal the bar appears after ``delay`` seconds and is redrawn at most every ``interval`` seconds;
    elsewhere a line is printed every ``log_interval`` seconds (the first after that long).
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        delay: float = 1.0,
        interval: float = 0.1,
        log_interval: float = 30.0,
    ) -> None:
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()
        self.delay = delay if self.tty else log_interval
        self.interval = interval if self.tty else log_interval
        self._last = self.start - self.interval
        self._drawn = False

    def __call__(self, module: str, *done: Any) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.start >= self.delay and now - self._last >= self.interval:
            self._last = now
            self._draw(module, now - self.start)

    def line(self, module: str, seconds: float) -> str:
        filled = BAR_WIDTH * self.done // self.total
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        # Module names come from the input files: escaped, so they cannot move the cursor or ring the bell.
        where = one_line(module)
        return f"[{bar}] {self.done}/{self.total} modules, {seconds:.0f} s, {peak_rss_mb():.0f} MB peak: {where}"

    def _draw(self, module: str, seconds: float) -> None:
        text = self.line(module, seconds)
        if self.tty:
            # Clear the rest of the previous (possibly longer) line.
            self.stream.write("\r" + text + "\033[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line so what follows starts on a fresh one."""
        if self._drawn and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
