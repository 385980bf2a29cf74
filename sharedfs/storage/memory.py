"""A volume in memory, for fast deterministic tests of the core and protocol."""

from __future__ import annotations

import trio

from ..errors import StorageError
from . import Storage


class MemoryStorage(Storage):
    """A bytearray volume that records every write as (offset, length).

    Several hosts in one process share one MemoryStorage, as hosts share a disk.
    """

    def __init__(self, size: int, name: str = "memory") -> None:
        self.name = name
        self.size = size
        self._data = bytearray(size)
        self.reads = 0
        self.writes = 0
        self.write_log: list[tuple[int, int]] = []

    def read_sync(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise StorageError(f"{self.name}: read past the end")
        self.reads += 1
        return bytes(self._data[offset : offset + length])

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise StorageError(f"{self.name}: write past the end")
        self.writes += 1
        self.write_log.append((offset, len(data)))
        self._data[offset : offset + len(data)] = data

    async def read(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.read_sync(offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.write_sync(offset, data)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        pass
