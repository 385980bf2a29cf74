"""Volume backends behind one byte-addressed interface, and open_volume(name).

A volume is whatever holds the shared blocks: an image file, a block device
(opened O_DIRECT, since another machine's writes never reach this kernel's
page cache) or, later, an NBD export.  All I/O runs off the trio event loop.
"""

from __future__ import annotations

import abc
import os
import stat

from ..errors import QuietError

__all__ = ["Storage", "open_volume", "create_image"]


class Storage(abc.ABC):
    """Byte-addressed access to a shared volume.

    Attributes:
        name: how the user named the volume (for messages).
        size: its size in bytes.
        reads, writes: calls made (for the cache's counters and tests).
    """

    name: str
    size: int
    reads: int = 0
    writes: int = 0

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # Synchronous twins for tools that run before trio starts (mount's
    # pre-fork checks) or that have no event loop to keep responsive.
    @abc.abstractmethod
    def read_sync(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


def open_volume(name: str, *, create_size: int | None = None) -> Storage:
    """Open the volume `name` (a path for now; URIs arrive with the NBD backend).

    With `create_size`, a missing image file is created with that size and an
    existing regular file is given that size (mkfs only).
    """
    from .file import FileStorage

    if "://" in name:
        raise QuietError(f"{name}: volume URIs are not supported yet; give a file or device path")
    if create_size is not None:
        create_image(name, create_size)
    return FileStorage.open(name)


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
