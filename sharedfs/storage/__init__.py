"""Volume backends behind one byte-addressed interface, and open_volume(name).

A volume is whatever holds the shared blocks: an image file, a block device
(opened O_DIRECT, since another machine's writes never reach this kernel's
page cache) or an NBD export named by URI (storage/uri.py).  No I/O blocks
the trio event loop.
"""

from __future__ import annotations

import abc
import os
import stat

from ..errors import QuietError
from .uri import is_uri, parse_nbd_uri

__all__ = ["Storage", "open_volume", "canonical_name", "create_image"]


class Storage(abc.ABC):
    """Byte-addressed access to a shared volume.

    Attributes:
        name: how the user named the volume (for messages).
        size: its size in bytes.
        reads, writes: calls made (for the cache's counters and tests).
        shared: what one host's handle completed writing is what another
            host's handle reads, and a flush on one makes it durable for all
            (an image file or a disk: yes; NBD: when the server says so).
        min_block: writes must be aligned to this many bytes.
        pipelined: many requests in flight at once go faster than one by
            one from a worker thread (NBD: one connection carries them all).
    """

    name: str
    size: int
    reads: int = 0
    writes: int = 0
    shared: bool = True
    min_block: int = 1
    pipelined: bool = False

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """With `fua` (forced unit access), durable when it returns."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def trim(self, offset: int, length: int) -> None:  # noqa: B027 - optional
        """The range's contents are no longer needed: storage may give the
        space back (and read anything there until it is written again)."""

    def counters(self) -> dict[str, int]:
        """What a layer has to report to status and /metrics (none by default)."""
        return {}

    async def will_write(self, ranges: list[tuple[int, int]]) -> None:  # noqa: B027 - optional
        """These (offset, length) ranges are about to be written: a layer
        that prepares for each write (the mirror's marks) may do it for all
        of them at once.  Only a hint: each write still does what it must."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # Synchronous twins for tools that run before trio starts (mount's
    # pre-fork checks) or that have no event loop to keep responsive.
    @abc.abstractmethod
    def read_sync(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


def open_volume(
    name: str,
    *,
    create_size: int | None = None,
    writable: bool = True,
    nbd_timeout: float | None = None,
) -> Storage:
    """Open the volume `name`: a path, or an NBD URI.

    With `create_size`, a missing image file is created with that size and an
    existing regular file is given that size (mkfs only).  `writable=False`
    opens it for reading only.  `nbd_timeout`: how long an NBD volume keeps
    trying to reach a server it lost before failing (default 30 s).
    """
    if is_uri(name):
        from .nbd import DEFAULT_TIMEOUT, NbdStorage

        timeout = DEFAULT_TIMEOUT if nbd_timeout is None else nbd_timeout
        return NbdStorage.open(name, timeout=timeout, writable=writable)
    from .file import FileStorage

    if create_size is not None:
        create_image(name, create_size)
    return FileStorage.open(name, writable=writable)


def canonical_name(name: str) -> str:
    """The volume's name as it opens from anywhere (mountinfo shows it)."""
    if is_uri(name):
        return str(parse_nbd_uri(name))
    return os.path.abspath(name)


def create_image(path: str, size: int) -> None:
    """Create an image file of exactly `size` bytes (sparse), or resize an
    existing one, so the backup superblock in the last block is where tools
    look for it; block devices are left alone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise QuietError(f"{path}: {e.strerror}") from None
    if st is not None and stat.S_ISBLK(st.st_mode):
        return
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise QuietError(f"{path}: not a regular file or block device")
    try:
        with open(path, "ab") as f:
            f.truncate(size)
    except OSError as e:
        raise QuietError(f"{path}: cannot create image: {e.strerror}") from None
