"""Progress for long work: a line that updates in place on a terminal, silent
otherwise (logs and pipes get no noise)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, total: int, *, stream=None) -> None:  # type: ignore[no-untyped-def]
        self.what = what
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and done < self.total):
            return
        self._last = now
        pct = 100 * done // self.total
        self.stream.write(f"\r{self.what}: {pct:3d}% ({done}/{self.total})")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(f"\r{self.what}: done{' ' * 30}\n")
            self.stream.flush()
