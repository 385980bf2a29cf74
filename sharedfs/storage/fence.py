"""A host's gate to the shared volume, which it closes when it is fenced.

A host that has lost its lease must not write to storage: the master has
declared it dead and another host is rebuilding what it held.  Every write
of a cluster host goes through one `Fence`; once closed, writes fail (the
operation that asked gets EIO) while reads still work.
"""

from __future__ import annotations

from ..errors import StorageError
from . import Storage


class Fenced(StorageError):
    """A write after the host was fenced."""


class Fence(Storage):
    """Attributes:
    inner: the volume.
    reason: why it was closed ("" while open).
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.shared = inner.shared
        self.min_block = inner.min_block
        self.reason = ""

    def close_gate(self, reason: str) -> None:
        self.reason = reason

    def _check(self) -> None:
        if self.reason:
            raise Fenced(f"{self.name}: fenced ({self.reason}): no writes")

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self._check()
        await self.inner.write(offset, data, fua=fua)

    async def flush(self) -> None:
        self._check()
        await self.inner.flush()

    def counters(self) -> dict[str, int]:
        return self.inner.counters()

    async def will_write(self, ranges: list[tuple[int, int]]) -> None:
        self._check()
        await self.inner.will_write(ranges)

    def close(self) -> None:
        self.inner.close()

    def read_sync(self, offset: int, length: int) -> bytes:
        return self.inner.read_sync(offset, length)

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check()
        self.inner.write_sync(offset, data)
