"""Storage faults under a cluster host: a write the device fails, a write
torn between blocks.  The host withdraws (fences itself, as GFS2 withdraws
a node on an I/O error); the others recover what it held from storage and
the log, and nothing it acknowledged is lost."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from cluster_util import cluster
from conftest import CTX, ROOT, make_volume

from sharedfs.errors import FsError, StorageError
from sharedfs.fsck import run_fsck
from sharedfs.storage import Storage

BS = 4096


class FaultyStorage(Storage):
    """A host's view of the volume that can fail its writes.

    fail: every write and flush from now on raises StorageError.
    tear: the next write of more than one block lands only its first
        `tear` blocks, then raises (a device that lost power mid-write).
    after: writes and flushes that reached us after the first failure.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.name, self.size, self.shared = inner.name, inner.size, inner.shared
        self.min_block = inner.min_block
        self.fail = False
        self.tear: int | None = None
        self.failed = False
        self.after = 0
        self.torn: tuple[int, int] | None = None  # (offset, blocks landed)

    def _fault(self) -> None:
        if self.failed:
            self.after += 1
        if self.fail:
            self.failed = True
            raise StorageError(f"{self.name}: injected I/O error")

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data, *, fua: bool = False) -> None:  # type: ignore[no-untyped-def]
        self._fault()
        if self.tear is not None and len(data) > BS:
            landed, self.tear = self.tear, None
            await self.inner.write(offset, bytes(data[: landed * BS]))
            self.failed, self.torn = True, (offset, landed)
            raise StorageError(f"{self.name}: injected torn write")
        await self.inner.write(offset, data, fua=fua)

    async def flush(self) -> None:
        self._fault()
        await self.inner.flush()

    def read_sync(self, offset: int, length: int) -> bytes:
        return self.inner.read_sync(offset, length)

    def write_sync(self, offset: int, data) -> None:  # type: ignore[no-untyped-def]
        self._fault()
        self.inner.write_sync(offset, data)

    def counters(self) -> dict[str, int]:
        return self.inner.counters()

    def close(self) -> None:
        pass


def faulty_devices(faulty: dict[int, FaultyStorage]) -> Callable[[int, Storage], Storage]:
    """cluster()'s `wrap`: each host sees the volume through a FaultyStorage
    of its own, kept in `faulty` by node."""

    def wrap(node: int, storage: Storage) -> Storage:
        faulty[node] = FaultyStorage(storage)
        return faulty[node]

    return wrap


async def fsck_clean(storage) -> None:  # type: ignore[no-untyped-def]
    f = await run_fsck(storage, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems


async def acked_files(fs, parent: int, prefix: bytes, n: int) -> dict[bytes, bytes]:  # type: ignore[no-untyped-def]
    """n files made and fsync'd on `fs`: name -> contents."""
    out = {}
    for i in range(n):
        name = b"%s%d" % (prefix, i)
        data = name * (1 + 700 * i)
        ino = (await fs.create(parent, name, 0o644, CTX)).ino
        await fs.write(ino, 0, data)
        await fs.fsync(ino)
        out[name] = data
    return out


async def read_all(fs, parent: int, files: dict[bytes, bytes]) -> None:  # type: ignore[no-untyped-def]
    for name, data in files.items():
        ino = (await fs.lookup(parent, name)).ino
        assert await fs.read(ino, 0, len(data) + 1) == data, name


async def withdrawn(c, node: int) -> None:  # type: ignore[no-untyped-def]
    """Host `node` fenced itself for its storage, and the master recovered
    what it held (at once: it closed its connection; no lease lapse)."""
    fs = c.hosts[node]
    assert "storage failed" in fs.cache.fenced, fs.cache.fenced
    with trio.fail_after(5):
        await c.wait_recovered(node)
    assert c.directory.counters.hosts_failed == 1
    c.forget(node)  # its unmount could write nothing


@pytest.mark.parametrize("where", ["fsync", "write-back"])
async def test_a_host_whose_storage_fails_a_write_withdraws_and_loses_nothing_acked(where: str):
    faulty: dict[int, FaultyStorage] = {}
    wrap = faulty_devices(faulty)
    vol = await make_volume()
    async with cluster(vol, 3, checkpoint_every=None, wrap=wrap) as c:
        a, b, h3 = c.hosts
        mine = await acked_files(b, ROOT, b"b", 8)
        theirs = await acked_files(a, ROOT, b"a", 4)
        ino = (await b.create(ROOT, b"unacked", 0o644, CTX)).ino
        await b.write(ino, 0, b"u" * 10000)
        faulty[1].fail = True
        with pytest.raises((FsError, StorageError)):
            if where == "fsync":
                await b.fsync(ino)
            else:
                await b.log.checkpoint()
        await withdrawn(c, 1)
        assert faulty[1].after == 0  # nothing more reached the device
        # The survivors read all it acknowledged, and take its blocks over.
        await read_all(h3, ROOT, mine | theirs)
        await read_all(a, ROOT, mine)
        more = await acked_files(a, ROOT, b"c", 3)
        await read_all(h3, ROOT, more)
    await fsck_clean(vol)


async def test_a_write_torn_between_blocks_loses_nothing_committed():
    """Many files made on host b, then a write-back whose first write of
    several blocks lands only its first block: every file b made is there
    on the survivors, rebuilt from storage and the log (write-ahead put
    each one's records on storage before any block they change)."""
    faulty: dict[int, FaultyStorage] = {}
    wrap = faulty_devices(faulty)
    vol = await make_volume()
    async with cluster(vol, 3, checkpoint_every=None, wrap=wrap) as c:
        a, b, h3 = c.hosts
        d = (await b.mkdir(ROOT, b"d", 0o755, CTX)).ino
        made = {}
        for i in range(60):
            name = b"t%d" % i
            ino = (await b.create(d, name, 0o644, CTX)).ino
            await b.write(ino, 0, name * 50)
            made[name] = name * 50
        faulty[1].tear = 1
        with pytest.raises(StorageError):
            await b.cache.flush()
        assert faulty[1].torn is not None
        await withdrawn(c, 1)
        assert faulty[1].after == 0
        listed = {e.name for e, _ in await h3.readdir(d, 0, 1000)} - {b".", b".."}
        assert listed == set(made)
        for name, data in made.items():
            ino = (await a.lookup(d, name)).ino
            got = await a.read(ino, 0, 1000)
            # Data is not logged: a file's bytes that never reached storage
            # are zeros (as ext4's data=writeback), but never another's.
            assert got in (data, bytes(len(data))), name
    await fsck_clean(vol)
