"""Errors that cross module boundaries: user-facing ones carry an exit code."""

from __future__ import annotations

import errno


class QuietError(Exception):
    """An error to show the user as one line, with no traceback, then exit."""

    def __init__(self, msg: str, exitcode: int = 1) -> None:
        super().__init__(msg)
        self.exitcode = exitcode


class CorruptVolume(Exception):
    """On-disk data failed a check: bad magic, checksum, type or geometry."""


class FsError(Exception):
    """A filesystem operation failed with an errno (the FUSE layer passes it on)."""

    def __init__(self, err: int, msg: str = "") -> None:
        super().__init__(msg or errno.errorcode.get(err, str(err)))
        self.errno = err


class StorageError(Exception):
    """The volume could not be read or written."""
