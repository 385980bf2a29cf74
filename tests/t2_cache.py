"""The buffer cache over a memory volume, and the lock master it asks."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sharedfs import format as fmt
from sharedfs import protocol as p
from sharedfs.agent import LocalAgent as Agent
from sharedfs.agent import OpRetry
from sharedfs.cache import BlockCache, Shipped
from sharedfs.errors import CorruptVolume
from sharedfs.format import BlockType
from sharedfs.master import LockMaster
from sharedfs.pastimages import PastImage
from sharedfs.protocol import HostId, Mode, block_resource
from sharedfs.storage.memory import MemoryStorage

BS = 4096


def blk(storage: MemoryStorage, b: int, n: int = 1) -> bytes:
    return bytes(storage._data[b * BS : (b + n) * BS])


def make_cache(
    storage: MemoryStorage | None = None,
    master: LockMaster | None = None,
    node: int = 0,
    capacity: int = 1024,
) -> BlockCache:
    storage = storage if storage is not None else MemoryStorage(1 << 20)
    master = master if master is not None else LockMaster()
    return BlockCache(storage, BS, Agent(HostId(node), master), capacity=capacity)


def held(cache: BlockCache, b: int) -> Mode | None:
    return cache.agent.master.holders.get(block_resource(b), {}).get(cache.agent.host)


# --------------------------------------------------------------------------
# Reading


async def test_get_many_reads_adjacent_misses_in_one_read():
    storage = MemoryStorage(1 << 20)
    for b in range(10, 14):
        storage.write_sync(b * BS, bytes([b]) * BS)
    cache = make_cache(storage)
    bufs = await cache.get_many([10, 11, 12, 13], Mode.S)
    assert storage.reads == 1
    assert [bytes(b.data) for b in bufs] == [bytes([b]) * BS for b in range(10, 14)]
    assert cache.stats.storage_reads == 1 and cache.stats.misses == 4


async def test_get_many_one_read_per_run():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    bufs = await cache.get_many([9, 5, 6, 7], Mode.S)  # runs 5..7 and 9
    assert storage.reads == 2
    assert [b.blockno for b in bufs] == [9, 5, 6, 7]  # in the order asked


async def test_get_many_hits_need_no_read():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    await cache.get_many([3, 4], Mode.S)
    await cache.get_many([3, 4, 5], Mode.S)  # only 5 is missing
    assert storage.reads == 2
    await cache.get(4, Mode.S)
    assert storage.reads == 2
    assert cache.stats.hits == 3


async def test_get_verifies_metadata_blocks():
    storage = MemoryStorage(1 << 20)
    good = bytearray(BS)
    fmt.seal(good, BlockType.INDIRECT, 7, 1)
    storage.write_sync(7 * BS, good)
    cache = make_cache(storage)
    assert (await cache.get(7, Mode.S, BlockType.INDIRECT)).btype is BlockType.INDIRECT
    with pytest.raises(CorruptVolume):
        await cache.get(8, Mode.S, BlockType.INDIRECT)  # zeros: not a metadata block
    with pytest.raises(CorruptVolume):
        await cache.get(7, Mode.S, BlockType.DIRHDR)  # cached as another type


async def test_get_rejects_block_sealed_for_another_place():
    storage = MemoryStorage(1 << 20)
    buf = bytearray(BS)
    fmt.seal(buf, BlockType.INDIRECT, 7, 1)
    storage.write_sync(8 * BS, buf)  # a misdirected write
    cache = make_cache(storage)
    with pytest.raises(CorruptVolume, match="names block 7"):
        await cache.get(8, Mode.S, BlockType.INDIRECT)


# --------------------------------------------------------------------------
# Writing back


async def test_flush_writes_adjacent_dirty_blocks_in_one_write():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    for b in (20, 21, 22, 30):
        buf = cache.new(b)
        buf.data[:] = bytes([b]) * BS
        cache.mark_dirty(buf)
    assert cache.dirty_count == 4
    assert await cache.flush() == 4
    assert storage.write_log == [(20 * BS, 3 * BS), (30 * BS, BS)]
    assert blk(storage, 20, 3) == bytes([20]) * BS + bytes([21]) * BS + bytes([22]) * BS
    assert blk(storage, 30) == bytes([30]) * BS
    assert cache.dirty_count == 0
    assert await cache.flush() == 0  # nothing left
    assert len(storage.write_log) == 2


async def test_a_write_asked_of_a_clean_copy_never_puts_an_older_past_image_back():
    """We hold a clean copy, newer than a past image we still keep (its
    notice had not come): asked to write, we write the copy, never the
    image, which put an old log header back, with the log's end behind
    pages already written (a CI run).  Not writing at all lost fsync'd
    files in a SIGSTOP trial: a read copy is clean here while its owner,
    dead, never wrote it."""
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    buf = cache.new(40)
    buf.data[:] = b"new" * (BS // 3) + b"n"
    cache.mark_dirty(buf)
    await cache.flush()
    mark = len(storage.write_log)
    cache.pis.keep(40, PastImage(buf.version - 1, 1, b"old" * (BS // 3) + b"o", None), 0)
    landed: list[list[tuple[int, int]]] = []

    async def report(written: list[tuple[int, int]]) -> None:
        landed.append(written)

    await cache.perform_write([40], report)
    assert landed == [[(40, buf.version)]]
    assert storage.write_log[mark:] == [(40 * BS, BS)]  # the copy, not the image
    assert blk(storage, 40).startswith(b"new")


async def test_a_checked_write_of_a_past_image_leaves_a_newer_storage_copy_and_says_so():
    """A master that lost track of storage asks for our past image checked:
    storage has a newer version (another host wrote it), so nothing is
    written, and the version storage has is what we report: the master
    then knows it, and writes no older past image over it."""
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    buf = cache.new(40, BlockType.INODES)
    buf.data[fmt.HDR_SIZE :] = b"n" * (BS - fmt.HDR_SIZE)
    cache.mark_dirty(buf)
    await cache.flush()
    newer = buf.version
    mark = len(storage.write_log)
    old = bytearray(BS)
    cache.pis.keep(40, PastImage(newer - 1, 1, bytes(old), BlockType.INODES), 0)
    landed: list[list[tuple[int, int]]] = []

    async def report(written: list[tuple[int, int]]) -> None:
        landed.append(written)

    await cache.perform_write_checked([40], report)
    assert landed == [[(40, newer)]]
    assert storage.write_log[mark:] == []
    assert fmt.stored_version(blk(storage, 40), 40) == newer


async def test_a_write_of_only_a_past_image_never_goes_over_a_newer_storage_copy():
    """Asked to write a block of which we keep only a past image (a
    rebuild holds the block here, no copy read yet), we find storage newer
    (another host wrote it, and that write's notice died with the master
    that moved): nothing is written, and what storage has is reported.
    (A torture run put v28734 back over v29298 this way.)"""
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    buf = cache.new(40, BlockType.INODES)
    cache.mark_dirty(buf)
    await cache.flush()
    newer = buf.version
    cache._bufs.pop(40)  # it left: only the image stays
    cache.pis.keep(40, PastImage(newer - 1, 1, bytes(BS), BlockType.INODES), 0)
    mark = len(storage.write_log)
    landed: list[list[tuple[int, int]]] = []

    async def report(written: list[tuple[int, int]]) -> None:
        landed.append(written)

    await cache.perform_write([40], report)
    assert landed == [[(40, newer)]]
    assert storage.write_log[mark:] == []


async def test_flush_seals_metadata_with_version():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    a = cache.new(40, BlockType.INDIRECT)
    fmt.set_ptr(a.data, 0, 1234)
    cache.mark_dirty(a)
    b = cache.new(41, BlockType.DIRHDR)
    fmt.write_dirhdr(b.data, 1, 2, 3)
    cache.mark_dirty(b)
    cache.mark_dirty(b)
    assert b.version > a.version
    await cache.flush()
    assert storage.write_log == [(40 * BS, 2 * BS)]
    ha = fmt.verify(blk(storage, 40), BlockType.INDIRECT, 40)
    hb = fmt.verify(blk(storage, 41), BlockType.DIRHDR, 41)
    assert ha.version == a.version and hb.version == b.version
    assert fmt.get_ptr(blk(storage, 40), 0) == 1234
    assert fmt.read_dirhdr(blk(storage, 41)) == (1, 2, 3)
    # A second cache reads them back through verification.
    other = make_cache(storage)
    got = await other.get(40, Mode.S, BlockType.INDIRECT)
    assert fmt.get_ptr(got.data, 0) == 1234


async def test_flush_named_blocks_only():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    for b in (1, 2, 3):
        cache.new(b)
    assert await cache.flush([2, 99]) == 1
    assert storage.write_log == [(2 * BS, BS)]
    assert cache.dirty_count == 2


async def test_flush_data_blocks_are_raw():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    buf = cache.new(50)
    buf.data[:] = b"\xab" * BS
    cache.mark_dirty(buf)
    await cache.sync()
    assert blk(storage, 50) == b"\xab" * BS  # no header stamped on data


async def test_redirtied_block_is_written_again():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    buf = cache.new(5)
    await cache.flush()
    buf.data[:4] = b"abcd"
    cache.mark_dirty(buf)
    await cache.flush()
    assert blk(storage, 5)[:4] == b"abcd"
    assert len(storage.write_log) == 2


async def test_mark_dirty_without_x_asserts():
    cache = make_cache()
    buf = await cache.get(3, Mode.S)
    with pytest.raises(AssertionError):
        cache.mark_dirty(buf)
    assert cache.dirty_count == 0


async def test_mark_dirty_after_upgrade_to_x():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    buf = await cache.get(3, Mode.S)
    again = await cache.get(3, Mode.X)
    assert again is buf and buf.mode is Mode.X
    assert storage.reads == 1
    cache.mark_dirty(buf)
    assert cache.dirty_count == 1


async def test_new_is_zeroed_private_x_without_read_or_lock_request():
    storage = MemoryStorage(1 << 20)
    storage.write_sync(6 * BS, b"\xff" * BS)
    master = LockMaster()
    cache = make_cache(storage, master)
    buf = cache.new(6, BlockType.INDIRECT)
    assert bytes(buf.data) == bytes(BS)
    assert buf.mode is Mode.X and buf.private and buf.dirty
    assert storage.reads == 0
    assert master.requests == 0 and cache.stats.lock_requests == 0
    # A later get is a hit on the private buffer.
    assert await cache.get(6, Mode.X, BlockType.INDIRECT) is buf
    assert storage.reads == 0


async def test_new_replaces_a_cached_block():
    storage = MemoryStorage(1 << 20)
    storage.write_sync(6 * BS, b"\xff" * BS)
    cache = make_cache(storage)
    old = await cache.get(6, Mode.X)
    assert bytes(old.data) == b"\xff" * BS
    buf = cache.new(6)
    assert buf is not old and bytes(buf.data) == bytes(BS)
    await cache.flush()
    assert blk(storage, 6) == bytes(BS)


async def test_private_blocks_stay_private_until_registered():
    cache = make_cache()
    buf = cache.new(9)
    await cache.flush()
    # Written, but no other host can reach it yet: still no lock at the master.
    assert buf.private and not buf.dirty
    assert ("block", 9) not in cache.agent.master.holders
    await cache.register_private()
    assert not buf.private
    assert cache.agent.master.holders[("block", 9)] == {cache.agent.host: Mode.X}


async def test_a_block_held_in_s_leaves_without_registering_ours():
    """Only a block we hold in X can point at blocks we allocated: one in S
    leaves with no registration (which could wait for a host giving up a
    block we hold in S, for its own registration: a cycle)."""
    cache = make_cache()
    master = cache.agent.master
    await cache.get(3, Mode.S)
    await cache.get(4, Mode.X)
    new = cache.new(9)
    shipped = await cache._leave(3, Mode.N)
    assert new.private and ("block", 9) not in master.holders
    assert shipped.data == blk(cache.storage, 3) and 3 not in cache._bufs  # type: ignore[arg-type]
    await cache._leave(4, Mode.N)
    assert not new.private and master.holders[("block", 9)] == {cache.agent.host: Mode.X}


async def test_overwrite_takes_no_storage_read():
    storage = MemoryStorage(1 << 20)
    storage.write_sync(12 * BS, b"\x11" * BS)
    cache = make_cache(storage)
    buf = await cache.overwrite(12)
    assert storage.reads == 0
    assert buf.mode is Mode.X and held(cache, 12) is Mode.X
    buf.data[:] = b"\x22" * BS
    cache.mark_dirty(buf)
    await cache.flush()
    assert blk(storage, 12) == b"\x22" * BS


async def test_overwrite_of_cached_block_keeps_it():
    storage = MemoryStorage(1 << 20)
    storage.write_sync(12 * BS, b"\x11" * BS)
    cache = make_cache(storage)
    first = await cache.get(12, Mode.S)
    buf = await cache.overwrite(12)
    assert buf is first and buf.mode is Mode.X
    assert storage.reads == 1


async def test_discard_drops_dirty_block_unwritten():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage)
    buf = cache.new(7)
    buf.data[:] = b"x" * BS
    cache.mark_dirty(buf)
    cache.new(8)
    cache.discard(7)
    assert cache.dirty_count == 1
    await cache.flush()
    assert storage.write_log == [(8 * BS, BS)]
    assert blk(storage, 7) == bytes(BS)
    # Reading it again goes to storage.
    await cache.get(7, Mode.S)
    assert storage.reads == 1


class GatedStorage(MemoryStorage):
    """A memory volume whose writes wait for `gate`: a write in flight."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = trio.Event()

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        await self.gate.wait()
        await super().write(offset, data, fua=fua)


async def test_change_during_write_back_redirties():
    storage = GatedStorage(1 << 20)
    cache = make_cache(storage)
    buf = cache.new(3)
    buf.data[:3] = b"old"
    cache.mark_dirty(buf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.flush)
        await trio.testing.wait_all_tasks_blocked()
        buf.data[:3] = b"new"
        cache.mark_dirty(buf)
        storage.gate.set()
    assert blk(storage, 3)[:3] == b"old"
    assert cache.dirty_count == 1
    await cache.flush()
    assert blk(storage, 3)[:3] == b"new"


async def test_a_write_for_the_master_reports_what_needs_no_force_before_forcing():
    """Asked to write blocks 50 and 51, we write 50; meanwhile an operation
    commits a change to 51, whose records must now be forced, which waits
    for the LLOL.  50 is reported first: the LLOL's holder may be waiting
    for it (a hang seen in a trace, with the log header as 50)."""
    storage = GatedStorage(1 << 20)
    cache = make_cache(storage)
    for b in (50, 51):
        buf = cache.new(b)
        buf.data[:] = bytes([b]) * BS
        cache.mark_dirty(buf)
    unlogged: set[int] = set()
    llol = trio.Event()
    forced: list[set[int]] = []

    async def wal(blocks) -> None:  # type: ignore[no-untyped-def]
        forced.append(set(blocks))
        await llol.wait()
        unlogged.clear()

    cache.logged = lambda blocks: not unlogged & set(blocks)
    cache.wal = wal
    landed: list[list[tuple[int, int]]] = []

    async def report(written: list[tuple[int, int]]) -> None:
        landed.append(written)

    v50, v51 = cache._bufs[50].version, cache._bufs[51].version
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.perform_write, [50, 51], report)
        await trio.testing.wait_all_tasks_blocked()  # writing 50
        unlogged.add(51)
        storage.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert landed == [[(50, v50)]] and forced == [{51}]
        llol.set()
    assert landed == [[(50, v50)], [(51, v51)]]
    assert blk(storage, 51) == bytes([51]) * BS


async def test_block_freed_during_write_back_is_skipped():
    storage = GatedStorage(1 << 20)
    cache = make_cache(storage)
    for b in (1, 2, 5):
        cache.new(b)
    written: list[int] = []

    async def flush() -> None:
        written.append(await cache.flush())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()  # writing blocks 1-2
        cache.discard(5)
        storage.gate.set()
    assert written == [2]
    assert storage.write_log == [(1 * BS, 2 * BS)]


async def test_trim_never_evicts_a_block_whose_write_is_in_flight():
    storage = GatedStorage(1 << 20)
    cache = make_cache(storage, capacity=64)
    for b in range(10):
        buf = cache.new(b)
        buf.data[0] = 0x77
        cache.mark_dirty(buf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.flush)
        await trio.testing.wait_all_tasks_blocked()
        # Blocks 0-9 are clean now, but storage does not have them yet.
        assert cache.dirty_count == 0
        await cache.get_many(list(range(100, 200)), Mode.S)
        await cache.trim()
        assert all(b in cache._bufs for b in range(10))
        assert len(cache._bufs) == 64
        storage.gate.set()
    assert all(blk(storage, b)[0] == 0x77 for b in range(10))
    # Once written they are ordinary clean blocks, and the coldest.
    await cache.get_many(list(range(200, 210)), Mode.S)
    await cache.trim()
    assert not any(b in cache._bufs for b in range(10))


# --------------------------------------------------------------------------
# Eviction


async def test_trim_evicts_cold_clean_blocks_and_releases_locks():
    storage = MemoryStorage(1 << 20)
    master = LockMaster()
    cache = make_cache(storage, master, capacity=64)
    await cache.get_many(list(range(100)), Mode.S)
    await cache.get(0, Mode.S)  # block 0 is now the hottest
    assert len(master.holders) == 100
    await cache.trim()
    assert cache.stats.evictions == 36
    kept = {b for b in range(100) if held(cache, b) is not None}
    assert kept == {0} | set(range(37, 100))
    assert len(master.holders) == 64
    # An evicted block is read again; a kept one is not.
    reads = storage.reads
    await cache.get(50, Mode.S)
    assert storage.reads == reads
    await cache.get(1, Mode.S)
    assert storage.reads == reads + 1


def copy_of(b: int) -> p.Transfer:
    """Another host's clean copy of block b, shipped with Ping.primary: the
    sender stays its primary cache."""
    return p.Transfer(1, b, int(Mode.S), 0, False, 0, 0, True, 0, bytes([b]) * BS, copy=True)


async def test_trim_evicts_copies_of_other_hosts_primaries_first():
    """Seed 001: copies whose primary is another host go before the
    blocks we are primary for, however cold those are; a copy made
    primary, or one taken in X, is kept like our own."""
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage, capacity=64)
    await cache.get_many(list(range(60)), Mode.S)  # ours, read from storage: the coldest
    arrived = {b: copy_of(b) for b in range(100, 110)}
    async with cache._locked(list(arrived), Mode.S):
        cache.install(arrived, list(arrived), Mode.S)
    cache.made_primary([100])
    cache.install({101: copy_of(101)}, [101], Mode.X)
    await cache.get(109, Mode.S)  # the hottest of them
    await cache.trim()  # 70 blocks: 6 go
    assert cache.stats.evictions == cache.stats.copies_evicted == 6
    assert {b for b in range(100, 110) if b in cache._bufs} == {100, 101, 108, 109}
    assert all(b in cache._bufs for b in range(60))
    await cache.get_many(list(range(200, 204)), Mode.S)
    await cache.trim()  # 4 go: the last two copies, then our coldest two
    assert cache.stats.copies_evicted == 8 and cache.stats.evictions == 10
    assert {0, 1, 108, 109}.isdisjoint(cache._bufs) and {2, 100, 101} <= set(cache._bufs)


async def test_trim_keeps_dirty_blocks():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage, capacity=64)
    for b in range(10):
        buf = await cache.get(b, Mode.X)
        buf.data[0] = 0x5A
        cache.mark_dirty(buf)
    await cache.get_many(list(range(10, 100)), Mode.S)
    await cache.trim()
    assert cache.dirty_count == 10
    assert all(held(cache, b) is Mode.X for b in range(10))
    assert len(cache._bufs) == 64
    await cache.flush()
    assert all(blk(storage, b)[0] == 0x5A for b in range(10))


async def test_trim_flushes_past_dirty_limit():
    storage = MemoryStorage(1 << 20)
    cache = make_cache(storage, capacity=64)  # dirty_limit 32
    for b in range(40):
        cache.new(b)
    await cache.trim()
    assert cache.dirty_count == 0
    assert storage.write_log == [(0, 40 * BS)]


async def test_drop_all_releases_clean_blocks():
    master = LockMaster()
    cache = make_cache(master=master)
    await cache.get_many([1, 2, 3], Mode.S)
    buf = await cache.get(4, Mode.X)
    cache.mark_dirty(buf)
    cache.drop_all()
    assert set(master.holders) == {block_resource(4)}


# --------------------------------------------------------------------------
# Lock requests


async def test_one_lock_request_for_many_blocks():
    master = LockMaster()
    cache = make_cache(master=master)
    await cache.get_many(list(range(10, 20)), Mode.S)
    assert cache.stats.lock_requests == 1 and master.requests == 1
    assert {r: h for r, h in master.holders.items()} == {
        block_resource(b): {0: Mode.S} for b in range(10, 20)
    }


async def test_no_lock_request_when_mode_held():
    master = LockMaster()
    cache = make_cache(master=master)
    await cache.get_many([1, 2, 3], Mode.S)
    await cache.get_many([1, 2, 3], Mode.S)
    await cache.get(2, Mode.S)
    assert master.requests == 1
    await cache.get_many([1, 2], Mode.X)  # an upgrade is a request
    assert master.requests == 2
    assert held(cache, 1) is Mode.X and held(cache, 3) is Mode.S
    await cache.get_many([1, 2], Mode.S)  # X covers S
    await cache.get(1, Mode.X)
    assert master.requests == 2 and cache.stats.lock_requests == 2


async def test_upgrade_requests_only_blocks_lacking_the_mode():
    master = LockMaster()
    cache = make_cache(master=master)
    await cache.get(1, Mode.X)
    grants = master.grants
    await cache.get_many([1, 2, 3], Mode.X)
    assert master.grants - grants == 2


async def test_cache_waits_for_another_hosts_x():
    storage = MemoryStorage(1 << 20)
    master = LockMaster()
    a = make_cache(storage, master, node=0)
    b = make_cache(storage, master, node=1)
    buf = await a.get(5, Mode.X)
    buf.data[:3] = b"new"
    a.mark_dirty(buf)
    got: list[bytes] = []
    reads = storage.reads

    async def reader() -> None:
        got.append(bytes((await b.get(5, Mode.S)).data[:3]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and master.waits >= 1
        assert storage.reads == reads  # b did not read before it had the lock
        # The holder writes back, then gives up its lock.
        await a.flush()
        a.drop_all()
    assert got == [b"new"]
    assert held(b, 5) is Mode.S and held(a, 5) is None


# --------------------------------------------------------------------------
# The lock master itself


R = block_resource(1)


async def test_master_shared_holds_are_compatible():
    master = LockMaster()
    a, b = Agent(HostId(1), master), Agent(HostId(2), master)
    await a.acquire(R, Mode.S)
    with trio.fail_after(1):
        await b.acquire(R, Mode.S)
    assert master.holders[R] == {1: Mode.S, 2: Mode.S}
    assert master.waits == 0 and master.grants == 2


async def test_master_x_waits_until_holder_releases():
    master = LockMaster()
    a, b = Agent(HostId(1), master), Agent(HostId(2), master)
    await a.acquire(R, Mode.S)
    done = trio.Event()

    async def want_x() -> None:
        await b.acquire(R, Mode.X)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want_x)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert master.holders[R] == {1: Mode.S}
        assert master.waits == 1
        a.release_block(1)
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()
    assert master.holders[R] == {2: Mode.X}


async def test_master_s_waits_for_x_and_x_for_x():
    master = LockMaster()
    a, b, c = (Agent(HostId(i), master) for i in (1, 2, 3))
    await a.acquire(R, Mode.X)
    order: list[str] = []

    async def want(agent: Agent, mode: Mode, tag: str) -> None:
        await agent.acquire(R, mode)
        order.append(tag)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want, b, Mode.S, "b")
        nursery.start_soon(want, c, Mode.X, "c")
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        a.release_block(1)
        await trio.testing.wait_all_tasks_blocked()
        # Exactly one of them got in; the other still waits on it.
        assert len(order) == 1
        winner = b if order == ["b"] else c
        assert set(master.holders[R]) == {winner.host}
        winner.release_block(1)
    assert len(order) == 2


async def test_master_downgrade_lets_readers_in():
    master = LockMaster()
    a, b = Agent(HostId(1), master), Agent(HostId(2), master)
    await a.acquire(R, Mode.X)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire, R, Mode.S)
        await trio.testing.wait_all_tasks_blocked()
        assert 2 not in master.holders[R]
        master.release(HostId(1), R, Mode.S)
    assert master.holders[R] == {1: Mode.S, 2: Mode.S}


async def test_master_own_hold_never_blocks():
    master = LockMaster()
    a = Agent(HostId(1), master)
    await a.acquire(R, Mode.X)
    with trio.fail_after(1):
        await a.acquire(R, Mode.S)
        await a.acquire(R, Mode.X)
    assert master.holders[R] == {1: Mode.X}  # a lower request keeps the higher mode
    assert master.waits == 0


async def test_master_release_all():
    master = LockMaster()
    a, b = Agent(HostId(1), master), Agent(HostId(2), master)
    async with a.taking([1, 2, 3], Mode.X):
        pass
    async with b.taking([7], Mode.S):
        pass
    assert master.requests == 2 and master.grants == 4
    got = trio.Event()

    async def want() -> None:
        async with b.taking([1, 2, 3], Mode.X):
            got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want)
        await trio.testing.wait_all_tasks_blocked()
        assert not got.is_set()
        a.close()
    assert got.is_set()
    assert master.holders == {block_resource(b): {2: Mode.X} for b in (1, 2, 3)} | {
        block_resource(7): {2: Mode.S}
    }
    b.close()
    assert master.holders == {}


async def test_master_release_unknown_is_harmless():
    master = LockMaster()
    master.release(HostId(5), R)
    a = Agent(HostId(1), master)
    await a.acquire(R, Mode.S)
    master.release(HostId(5), R)
    assert master.holders == {R: {1: Mode.S}}


def test_mode_compatibility():
    assert Mode.S.compatible(Mode.S)
    assert not Mode.S.compatible(Mode.X)
    assert not Mode.X.compatible(Mode.S)
    assert not Mode.X.compatible(Mode.X)
    assert Mode.N.compatible(Mode.X) and Mode.X.compatible(Mode.N)
    assert Mode.N < Mode.S < Mode.X


# --------------------------------------------------------------------------
# Giving blocks up to other hosts


def ping(block: int, keep: Mode) -> p.Ping:
    return p.Ping(block, 1, int(Mode.X if keep is Mode.N else Mode.S), int(keep), 1, 0, 0.0, True)


async def test_a_block_leaving_for_good_cannot_be_read_while_the_kernel_forgets_it():
    """A read served from the old copy after the kernel's caches were
    dropped would be cached by the kernel again, stale (seen as a size that
    never changed on a second host)."""
    cache = make_cache()
    buf = await cache.get(5, Mode.X)
    buf.data[:3] = b"old"
    cache.mark_dirty(buf)
    invalidating, release = trio.Event(), trio.Event()
    invalidated = []

    async def hook(b):  # type: ignore[no-untyped-def]
        invalidated.append(b.blockno)
        invalidating.set()
        await release.wait()

    cache.on_give_up = hook
    async with trio.open_nursery() as n:
        shipped: list[Shipped] = []

        async def give() -> None:
            shipped.append(await cache.give_up(ping(5, Mode.N)))

        n.start_soon(give)
        await invalidating.wait()
        cache.begin_op()
        with pytest.raises(OpRetry):
            await cache.get(5, Mode.S)
        cache.abort_op()
        release.set()
    assert invalidated == [5]
    assert shipped[0].data[:3] == b"old" and 5 in cache.pis


async def test_a_read_copy_kept_needs_no_invalidation_and_stays_readable():
    cache = make_cache()
    buf = await cache.get(5, Mode.X)
    cache.mark_dirty(buf)
    invalidated = []

    async def hook(b):  # type: ignore[no-untyped-def]
        invalidated.append(b.blockno)

    cache.on_give_up = hook
    await cache.give_up(ping(5, Mode.S))
    assert invalidated == []
    assert (await cache.get(5, Mode.S)) is buf and buf.mode is Mode.S


async def test_blocks_allocated_by_the_operation_a_ping_waited_for_are_registered_first():
    """The operation holding the pinged block links a new block into it and
    ends; only then may the block leave, and the new block must be known to
    the master by then, or the receiver would read it from storage."""
    cache = make_cache()
    registered_at_ship = []

    async def hook(b):  # type: ignore[no-untyped-def]
        registered_at_ship.append(("block", 9) in cache.agent.master.holders)

    cache.on_give_up = hook
    cache.begin_op()
    parent = await cache.get(5, Mode.X)
    async with trio.open_nursery() as n:
        n.start_soon(cache.give_up, ping(5, Mode.N))
        await trio.testing.wait_all_tasks_blocked()
        assert registered_at_ship == []  # waiting for the operation
        child = cache.new(9, BlockType.INDIRECT)
        parent.data[:4] = (9).to_bytes(4, "little")
        cache.mark_dirty(parent)
        cache.end_op()
    assert registered_at_ship == [True] and not child.private


async def test_an_undone_allocation_over_a_read_copy_leaves_it_not_private():
    """new() over a read copy we still held (of a block freed elsewhere),
    then the operation undone: the copy is back as it was, and not ours to
    register (a registration would take X with its stale contents, and keep
    them over those of the next host to allocate the block)."""
    cache = make_cache()
    await cache.get(3, Mode.S)
    cache.begin_op()
    cache.new(3, BlockType.INDIRECT)
    assert 3 in cache._private
    cache.abort_op()
    buf = cache._bufs[3]
    assert buf.mode is Mode.S and not buf.private and 3 not in cache._private
    await cache.register_private()
    assert held(cache, 3) is Mode.S


async def test_an_undone_operation_gets_back_the_blocks_it_freed():
    """A block freed by an operation that is then undone (OpRetry) is in use
    again; its contents, never written, must come back with it (else a
    retried unlink finds its file's map block as storage's garbage)."""
    cache = make_cache()
    cache.begin_op()
    fresh = cache.new(9, BlockType.INDIRECT)
    fresh.data[40:44] = b"map!"
    cache.mark_dirty(fresh)
    cache.end_op()
    cache.begin_op()
    cache.discard(9)
    assert 9 not in cache._bufs
    cache.abort_op()
    back = await cache.get(9, Mode.S, BlockType.INDIRECT)
    assert back.data[40:44] == b"map!" and back.dirty and back.private
