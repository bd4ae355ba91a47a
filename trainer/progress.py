"""Progress of long work on stderr: 'prepare: 40/500 (8%) images, 2 skipped, 3.1 images/s'.

Redrawn in place on a terminal (twice a second at most); elsewhere (a pipeline task's log) one
line every few seconds, and always a last line when the work ends.
"""

from __future__ import annotations

import sys
import time

TTY_SECONDS = 0.5
LOG_SECONDS = 5.0


class Progress:
    def __init__(self, label: str, total: int | None, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def rate(self, done: int) -> float:
        """Images per second since the start."""
        return done / max(time.monotonic() - self.start, 1e-9)

    def update(self, done: int, detail: str = "", final: bool = False) -> None:
        """`done` images so far; `detail` (", 2 skipped") follows the count."""
        now = time.monotonic()
        final = final or (self.total is not None and done >= self.total)
        if not self.enabled or (not final and now - self.last < (TTY_SECONDS if self.tty
                                                                  else LOG_SECONDS)):
            return
        self.last = now
        of = f"/{self.total} ({100 * done / max(self.total, 1):.0f}%)" if self.total else ""
        line = f"{self.label}: {done}{of} images{detail}, {self.rate(done):.2f} images/s"
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()
