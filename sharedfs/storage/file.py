"""The file backend: an image file or a block device shared by every host."""

from __future__ import annotations

import logging
import mmap
import os
import stat

import trio

from ..errors import QuietError, StorageError
from . import Storage

log = logging.getLogger(__name__)

# O_DIRECT needs buffers and offsets aligned to the device's logical block.
_ALIGN = 4096


class FileStorage(Storage):
    """pread/pwrite on one file descriptor, run in worker threads.

    Attributes:
        direct: opened with O_DIRECT (block devices), so reads bypass this
            kernel's page cache and see other machines' writes.
    """

    def __init__(self, name: str, fd: int, size: int, direct: bool) -> None:
        self.name = name
        self._fd = fd
        self.size = size
        self.direct = direct
        self.reads = 0
        self.writes = 0
        # A few threads let adjacent requests overlap without flooding the disk.
        self._limiter = trio.CapacityLimiter(4)

    @classmethod
    def open(cls, path: str, *, writable: bool = True) -> FileStorage:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise QuietError(f"{path}: no such file or device") from None
        except OSError as e:
            raise QuietError(f"{path}: {e.strerror}") from None
        is_blk = stat.S_ISBLK(st.st_mode)
        if not (is_blk or stat.S_ISREG(st.st_mode)):
            raise QuietError(f"{path}: not an image file or block device")
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_DIRECT if is_blk else 0)
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise QuietError(f"{path}: cannot open: {e.strerror}") from None
        size = os.lseek(fd, 0, os.SEEK_END)
        return cls(path, fd, size, is_blk)

    # -- synchronous core (runs in a worker thread) ---------------------------
    def read_sync(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        self.reads += 1
        try:
            if not self.direct:
                data = os.pread(self._fd, length, offset)
            else:
                buf = mmap.mmap(-1, _round_up(length))
                try:
                    os.preadv(self._fd, [buf], offset)
                    data = bytes(buf[:length])
                finally:
                    buf.close()
        except OSError as e:
            raise StorageError(f"{self.name}: read at {offset}: {e.strerror}") from e
        if len(data) != length:
            raise StorageError(f"{self.name}: short read at {offset}")
        return data

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._pwrite(offset, data, 0)

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview, flags: int) -> None:
        self._check_range(offset, len(data))
        self.writes += 1
        try:
            if not self.direct:
                n = os.pwritev(self._fd, [data], offset, flags)
            else:
                buf = mmap.mmap(-1, _round_up(len(data)))
                try:
                    buf[: len(data)] = data
                    n = os.pwritev(self._fd, [memoryview(buf)[: len(data)]], offset, flags)
                finally:
                    buf.close()
        except OSError as e:
            raise StorageError(f"{self.name}: write at {offset}: {e.strerror}") from e
        if n != len(data):
            raise StorageError(f"{self.name}: short write at {offset}")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise StorageError(f"{self.name}: I/O at {offset}+{length} is past the end")

    # -- async interface -----------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(self.read_sync, offset, length, limiter=self._limiter)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        # FUA makes this write durable, not all the others: RWF_DSYNC rather
        # than an fdatasync of the whole image (mirror indicators are
        # written so before data, and must not flush the data in flight).
        flags = os.RWF_DSYNC if fua else 0
        await trio.to_thread.run_sync(self._pwrite, offset, data, flags, limiter=self._limiter)

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fdatasync, self._fd, limiter=self._limiter)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
