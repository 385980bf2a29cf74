"""Progress bars for long work (mkfs of a large volume, fsck's passes): a
tqdm bar on a terminal, nothing otherwise, so logs and pipes get no noise.

tqdm rather than rich: a bar is all we draw, and tqdm is one small package
with no dependencies of its own that is quick to import; rich brings a whole
terminal renderer (and pygments) for the same line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class Progress:
    """A bar for `total` steps of `what`.

    Attributes:
        enabled: draw it (on by default when the stream is a terminal); a
            caller may turn it off before the first update (--quiet).
    """

    def __init__(self, what: str, total: int, *, stream: TextIO | None = None) -> None:
        self.what = what
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._bar: tqdm | None = None  # type: ignore[type-arg]

    def update(self, done: int) -> None:
        """`done` steps of the total are finished."""
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(
                total=self.total, desc=self.what, file=self.stream, mininterval=0.2, leave=True
            )
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
