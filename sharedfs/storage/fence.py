"""A host's gate to the shared volume, which it closes when it is fenced.

A host that has lost its lease must not write to storage: the master has
declared it dead and another host is rebuilding what it held.  Every write
of a cluster host goes through one `Fence`; once closed, writes fail (the
operation that asked gets EIO) while reads still work.

A write that the volume fails closes the gate too, as GFS2 withdraws a node
from the cluster on an I/O error: what the host has not written may now be
anywhere between old and new on storage, so it stops, and the other hosts
rebuild what it held from storage and the log.  (The storage below has
already retried what can be retried: an NBD connection that drops.)

A host that loses its master *holds* the gate (`hold`): its block writes
wait, since it cannot tell a master that restarted (and will take its word
for what it holds) from one that declared it dead.  The master's answer
when it is back either opens the gate again or closes it.  With the
directory spread over the hosts, each partition's agent holds it apart: it
opens once every one that lost its master has it back.  Its slot's
heartbeat and mirror marks (`write_sync`, its own areas, which no other
host rebuilds) go on meanwhile: the host is not dead until it is fenced.

A host that runs the lock master also keeps a *disk lease* (`disk_lease`):
once its last heartbeat on the volume is older than that, it closes its own
gate, before the other hosts, reading the same slot, could take it for dead
and start a master of their own (failover.py).  A host frozen (SIGSTOP, a
paused VM) past its lease thus writes nothing when it wakes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import trio

from ..errors import StorageError
from . import Storage


class Fenced(StorageError):
    """A write after the host was fenced."""


class Fence(Storage):
    """Attributes:
    inner: the volume.
    reason: why it was closed ("" while open).
    on_trip: called with the reason when a failed write closes it (the
        host's agent withdraws from the cluster).
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.shared = inner.shared
        self.min_block = inner.min_block
        self.reason = ""
        self.on_trip: Callable[[str], None] | None = None
        self._opened: trio.Event | None = None  # set while held
        self._holders: set[object] = set()
        self.disk_lease: tuple[float, Callable[[], float]] | None = None

    @property
    def held(self) -> bool:
        return self._opened is not None

    def hold(self, holder: object = None) -> None:
        """Block writes wait from now until every holder has called
        open_gate(), or close_gate()."""
        self._holders.add(holder)
        if self._opened is None:
            self._opened = trio.Event()

    def open_gate(self, holder: object = None) -> None:
        self._holders.discard(holder)
        if not self._holders:
            self._release()

    def close_gate(self, reason: str) -> None:
        self.reason = reason
        self._holders.clear()
        self._release()  # what waits fails now

    def _release(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.set()

    async def _wait_open(self) -> None:
        while self._opened is not None and not self.reason:
            await self._opened.wait()

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Refuse once closed; close on a failure of the write inside."""
        self._check()
        try:
            yield
        except StorageError as e:
            if not self.reason:
                self.close_gate(f"storage failed a {what}: {e}")
                if self.on_trip is not None:
                    self.on_trip(self.reason)
            raise

    def lapsed(self) -> bool:
        """Our disk lease is up (closing the gate if it was still open)."""
        if self.disk_lease is not None and not self.reason:
            seconds, when = self.disk_lease
            if (age := time.monotonic() - when()) > seconds:
                self.close_gate(
                    f"no heartbeat reached the volume for {age:.1f} s: "
                    "the other hosts may take this host for dead"
                )
                if self.on_trip is not None:
                    self.on_trip(self.reason)
        return bool(self.reason)

    def _check(self) -> None:
        if self.reason:
            raise Fenced(f"{self.name}: fenced ({self.reason}): no writes")

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        await self._wait_open()
        self.lapsed()
        with self._writing("write"):
            await self.inner.write(offset, data, fua=fua)

    async def flush(self) -> None:
        await self._wait_open()
        self.lapsed()
        with self._writing("flush"):
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
        with self._writing("write"):
            self.inner.write_sync(offset, data)
