"""The mirror's indicators and shipping (seed 004), in process: which
storage writes happened, in what order, on the primary and the secondary."""

from __future__ import annotations

import trio
import trio.testing
from conftest import CTX, ROOT, host, make_volume

from sharedfs import format as fmt
from sharedfs.errors import StorageError
from sharedfs.fsck import run_fsck
from sharedfs.mirror import (
    MAX_RECHECKS,
    SHIP_BATCH,
    MirrorStorage,
    attach_secondary,
    differing_regions,
    mirrored,
    promote_secondary,
    read_marks,
    resync,
)
from sharedfs.storage.fence import Fence
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock

MiB = 1 << 20


class Secondary(MemoryStorage):
    """A secondary that can be taken away (its writes and flushes fail, as
    a dead server's do) and that logs what reaches it, flushes included."""

    def __init__(self, size: int, events: list[tuple[str, int]]) -> None:
        super().__init__(size, "secondary")
        self.down = False
        self.events = events

    def write_sync(self, offset, data):  # type: ignore[no-untyped-def]
        if self.down:
            raise StorageError("secondary: gone")
        self.events.append(("secondary write", offset))
        super().write_sync(offset, data)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StorageError("secondary: gone")
        self.events.append(("secondary flush", 0))


class Primary(MemoryStorage):
    """The primary, logging its writes into the same list as the secondary's."""

    def __init__(self, size: int, events: list[tuple[str, int]]) -> None:
        super().__init__(size, "primary")
        self.events = events

    def write_sync(self, offset, data):  # type: ignore[no-untyped-def]
        self.events.append(("primary write", offset))
        super().write_sync(offset, data)


async def mirrored_pair(size: int = 64 * MiB) -> tuple[Primary, Secondary, fmt.Superblock]:
    """A formatted primary attached to an empty secondary (a full copy)."""
    events: list[tuple[str, int]] = []
    formatted = await make_volume(size)
    primary = Primary(size, events)
    primary.write_sync(0, formatted.read_sync(0, size))
    secondary = Secondary(size, events)
    sb = read_superblock(primary).with_secondary("secondary")
    assert await attach_secondary(primary, secondary, sb) == list(range(sb.region_count))
    events.clear()
    return primary, secondary, sb


def indicator_offset(sb: fmt.Superblock, node: int, region: int) -> int:
    return sb.indicator_block(node, region)[0] * sb.block_size


def on_storage(storage: MemoryStorage, sb: fmt.Superblock, node: int, region: int) -> bool:
    """Whether node's indicator for region is set on storage."""
    blockno, bit = sb.indicator_block(node, region)
    bits = fmt.read_indicators(storage.read_sync(blockno * sb.block_size, sb.block_size), blockno)
    assert bits is not None
    return fmt.bit_test(bits, bit)


async def until(pred, seconds: float = 10) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(seconds):
        while not pred():  # noqa: ASYNC110 - any predicate, no event to wait on
            await trio.sleep(0.005)


def data_offset(sb: fmt.Superblock, region: int) -> int:
    """A block in the middle of `region` (past the volume's first areas)."""
    first, count = sb.region_range(region)
    return (first + count // 2) * sb.block_size


async def test_indicator_is_on_storage_before_the_data_and_reset_after_the_ack():
    primary, secondary, sb = await mirrored_pair()
    m = MirrorStorage(primary, sb, 1, open_secondary=lambda: secondary)
    r = 20
    off = data_offset(sb, r)
    await m.write(off, b"x" * 4096)
    # Nothing shipped yet (no shipper runs): the write did not wait for it.
    assert primary.events == [("primary write", indicator_offset(sb, 1, r)), ("primary write", off)]
    assert on_storage(primary, sb, 1, r)
    assert m.updates[r] and m.marked() == {r}
    async with trio.open_nursery() as n:
        await n.start(m.run)
        await until(lambda: not on_storage(primary, sb, 1, r))
        await m.drain()
        n.cancel_scope.cancel()
    assert not m.updates and m.marked() == set()
    assert secondary.read_sync(off, 4096) == b"x" * 4096
    # The reset reached the primary only after the secondary flushed.
    assert primary.events[2:5] == [
        ("secondary write", off),
        ("secondary flush", 0),
        ("primary write", indicator_offset(sb, 1, r)),
    ]
    assert set(primary.events[5:]) <= {("secondary flush", 0)}  # the drain's
    assert await differing_regions(primary, secondary, sb) == []


async def test_a_region_already_marked_is_not_written_again():
    primary, secondary, sb = await mirrored_pair()
    m = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary)
    for i in range(5):
        await m.write(data_offset(sb, 30) + i * 4096, b"y" * 4096)
    await m.write(data_offset(sb, 31), b"z" * 4096)
    assert m.indicators.writes == 2  # one per region's first write
    assert len(m.updates[30]) == 5 and len(m.updates[31]) == 1


async def test_marks_survive_a_crash_and_resync_copies_exactly_those():
    primary, secondary, sb = await mirrored_pair()
    secondary.down = True
    m = MirrorStorage(primary, sb, 2, open_secondary=lambda: secondary)
    async with trio.open_nursery() as n:
        await n.start(m.run)
        for r in (5, 17, 40):
            await m.write(data_offset(sb, r), b"c" * 8192)
        await until(lambda: not m.reachable)
        n.cancel_scope.cancel()  # the host dies: no drain, no resets
    assert read_marks(primary, sb)[2] == {5, 17, 40}
    assert await differing_regions(primary, secondary, sb) == [5, 17, 40]
    secondary.down = False
    secondary.events.clear()
    assert await resync(primary, secondary, sb) == [5, 17, 40]
    copied = {
        off // (sb.mirror_region_blocks * sb.block_size)
        for k, off in secondary.events
        if k == "secondary write"
    }
    assert copied == {5, 17, 40}
    assert read_marks(primary, sb) == {n: set() for n in range(sb.host_slots)}
    assert await differing_regions(primary, secondary, sb) == []


async def test_writes_go_on_while_the_secondary_is_away_and_ship_when_it_is_back(caplog):
    primary, secondary, sb = await mirrored_pair()
    secondary.down = True
    async with mirrored(primary, sb, 0, open_secondary=lambda: secondary) as m:
        assert isinstance(m, MirrorStorage)
        for i in range(50):
            await m.write(data_offset(sb, 10 + i % 5) + i * 4096, bytes([i]) * 4096)
        await until(lambda: not m.reachable)
        assert m.marked() == set(range(10, 15))
        assert all(on_storage(primary, sb, 0, r) for r in range(10, 15))
        c = m.counters()
        assert c["mirror_reachable"] == 0 and c["mirror_marked_regions"] == 5
        assert c["mirror_queued_updates"] == 50 and c["mirror_queued_bytes"] == 50 * 4096
        secondary.down = False
        await until(lambda: not m.marked())
        await until(lambda: not any(on_storage(primary, sb, 0, r) for r in range(10, 15)))
    unreachable = [r for r in caplog.records if "secondary unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and "host 0" in unreachable[0].getMessage()
    assert await differing_regions(primary, secondary, sb) == []


async def test_an_update_overtaken_by_another_hosts_is_sent_again():
    """Host 0 writes a block, host 1 writes it again; host 1's update lands on
    the secondary first and host 0's (older) after it.  Host 0 sees that the
    primary changed and sends the newer contents: the secondary ends right."""
    primary, secondary, sb = await mirrored_pair()
    a = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary)
    b = MirrorStorage(primary, sb, 1, open_secondary=lambda: secondary)
    off = data_offset(sb, 25)
    await a.write(off, b"old!" * 1024)
    await b.write(off, b"new!" * 1024)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        await until(lambda: not b.marked())
        await n.start(a.run)
        await until(lambda: not a.marked())
        n.cancel_scope.cancel()
    assert a.rechecks == 1 and b.rechecks == 0
    assert secondary.read_sync(off, 4096) == b"new!" * 1024


class Busy(Primary):
    """A block another host keeps writing: each read of it by the shipper
    first lands a new version (as that host's write would), `busy` times."""

    def __init__(self, size: int, events: list[tuple[str, int]], offset: int) -> None:
        super().__init__(size, events)
        self.offset = offset
        self.busy = 0

    def read_sync(self, offset: int, length: int) -> bytes:
        if offset == self.offset and self.busy:
            self.busy -= 1
            self.write_sync(offset, bytes([self.busy % 251]) * length)
        return super().read_sync(offset, length)


async def busy_pair(r: int) -> tuple[Busy, Secondary, fmt.Superblock, int]:
    primary, secondary, sb = await mirrored_pair()
    busy = Busy(primary.size, primary.events, data_offset(sb, r))
    busy.write_sync(0, primary.read_sync(0, primary.size))
    return busy, secondary, sb, busy.offset


async def test_an_update_whose_block_keeps_changing_is_chased_later_not_left_stale():
    """Past MAX_RECHECKS in a row the update is put aside, region still
    marked, and shipped again later with the newest contents it read (one
    put, no recheck: the block is quiet by then): no resync needed."""
    r = 40
    primary, secondary, sb, off = await busy_pair(r)
    primary.busy = MAX_RECHECKS  # the first shipment gives up, the chase does not
    m = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary)
    async with trio.open_nursery() as n:
        await n.start(m.run)
        await m.write(off, b"w" * 4096)
        await until(lambda: m.rechecks >= MAX_RECHECKS)
        assert m.marked() == {r} and on_storage(primary, sb, 0, r)
        await until(lambda: not m.marked())
        await until(lambda: not on_storage(primary, sb, 0, r))
        await m.drain()
        n.cancel_scope.cancel()
    assert primary.busy == 0 and m.chases == 1 and m.dropped == 0
    assert m.rechecks == MAX_RECHECKS and m.shipments == MAX_RECHECKS + 1
    assert secondary.read_sync(off, 4096) == primary.read_sync(off, 4096) == bytes([0]) * 4096
    assert read_marks(primary, sb)[0] == set()


async def test_a_block_still_changing_as_the_mount_drains_is_left_marked():
    r = 41
    primary, secondary, sb, off = await busy_pair(r)
    primary.busy = 10**9  # never quiet
    m = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary)
    async with trio.open_nursery() as n:
        await n.start(m.run)
        await m.write(off, b"w" * 4096)
        await until(lambda: m.chases >= 2)  # chased, and chased again, while mounted
        assert m.marked() == {r} and not m.dropped
        with trio.fail_after(10):
            await m.drain()  # one last chase, then stale
        n.cancel_scope.cancel()
    assert m.dropped == 1 and m.stale == {r}
    assert read_marks(primary, sb)[0] == {r}
    assert await resync(primary, secondary, sb) == [r]


async def test_a_region_marked_while_its_reset_is_written_stays_marked():
    """The reset of region r is on its way to storage when a new write to r
    comes: the new write must wait and set the bit again, not trust the old."""
    primary, secondary, sb = await mirrored_pair()
    r = 33
    blockno, bit = sb.indicator_block(0, r)
    gate = trio.Event()

    class Slow(Primary):
        """Holds back the write that resets r's indicator until the gate opens."""

        async def write(self, offset, data, *, fua=False):  # type: ignore[no-untyped-def]
            if offset == blockno * sb.block_size:
                bits = fmt.read_indicators(bytes(data), blockno)
                if bits is not None and not fmt.bit_test(bits, bit):
                    await gate.wait()
            await super().write(offset, data, fua=fua)

    slow = Slow(primary.size, primary.events)
    slow.write_sync(0, primary.read_sync(0, primary.size))
    m = MirrorStorage(slow, sb, 0, open_secondary=lambda: secondary)
    off = data_offset(sb, r)
    async with trio.open_nursery() as n:
        await n.start(m.run)
        await m.write(off, b"1" * 4096)
        await until(lambda: not m.marked())
        await trio.testing.wait_all_tasks_blocked()  # the reset task, at the gate
        assert not m.indicators.is_durable(r) and on_storage(slow, sb, 0, r)
        n.start_soon(m.write, off, b"2" * 4096)
        await trio.testing.wait_all_tasks_blocked()
        assert slow.read_sync(off, 1) == b"1"  # the data write waits for its mark
        gate.set()
        await until(lambda: slow.read_sync(off, 1) == b"2")
        assert on_storage(slow, sb, 0, r)
        await until(lambda: not m.marked())
        await m.drain()
        n.cancel_scope.cancel()
    assert secondary.read_sync(off, 4096) == b"2" * 4096


async def test_a_full_queue_leaves_regions_marked_for_resync():
    primary, secondary, sb = await mirrored_pair()
    secondary.down = True
    m = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary, queue_bytes=16384)
    async with trio.open_nursery() as n:
        await n.start(m.run)
        for i in range(8):
            await m.write(data_offset(sb, 50 + i), b"q" * 4096)
        secondary.down = False
        await until(lambda: not m.queued_bytes)
        await m.drain()
        n.cancel_scope.cancel()
    # Four fit the queue and shipped; the other four wait for a resync.
    assert read_marks(primary, sb)[0] == {54, 55, 56, 57}
    assert await resync(primary, secondary, sb) == [54, 55, 56, 57]
    assert await differing_regions(primary, secondary, sb) == []


async def test_a_host_mirrors_its_filesystem_and_the_promoted_secondary_checks_clean():
    primary, secondary, sb = await mirrored_pair()
    primary.write_sync(0, sb.pack(0))
    async with mirrored(primary, sb, 0, open_secondary=lambda: secondary) as m:
        fs = host(m)  # type: ignore[arg-type]
        d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
        for i in range(20):
            f = await fs.create(d.ino, b"f%d" % i, 0o644, CTX)
            await fs.write(f.ino, 0, bytes([i]) * (i * 5000 + 1))
        await fs.destroy()
    assert not any(read_marks(primary, sb).values())
    assert await differing_regions(primary, secondary, sb) == []
    await promote_secondary(secondary, read_superblock(secondary))
    assert read_superblock(secondary).mirror_secondary == ""
    f = await run_fsck(secondary, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems
    fs = host(secondary)
    d = await fs.lookup(ROOT, b"d")
    f19 = await fs.lookup(d.ino, b"f19")
    assert await fs.read(f19.ino, 0, 200000) == bytes([19]) * 95001


async def test_fsck_repairs_of_a_mirrored_volume_are_marked():
    primary, secondary, sb = await mirrored_pair()
    primary.write_sync(0, sb.pack(0))
    primary.write_sync(sb.backup_blockno * sb.block_size, sb.pack(sb.backup_blockno))
    primary.write_sync(100, b"damage")  # the primary superblock, restored from the backup
    f = await run_fsck(primary, repair=True, force=True, progress=False)
    assert f.found_errors
    assert 0 in read_marks(primary, sb)[0]


async def test_a_damaged_indicator_block_marks_every_region_it_covers():
    primary, _secondary, sb = await mirrored_pair()
    primary.write_sync(indicator_offset(sb, 3, 0) + 64, b"\xff" * 16)
    assert read_marks(primary, sb)[3] == set(range(sb.region_count))


async def test_a_write_back_marks_all_its_regions_in_one_indicator_write():
    primary, secondary, sb = await mirrored_pair()
    m = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary)
    runs = [(data_offset(sb, r), 8192) for r in range(20, 30)]
    await m.will_write(runs)
    assert m.indicators.writes == 1
    assert all(on_storage(primary, sb, 0, r) for r in range(20, 30))
    for off, n in runs[:6]:  # the last four never come (the blocks went clean)
        await m.write(off, b"w" * n)
    assert m.indicators.writes == 1 and set(m.updates) == set(range(20, 26))
    assert m.marked() == set(range(20, 30))  # held a while for writes to come
    async with trio.open_nursery() as n:
        await n.start(m.run)
        await until(lambda: not any(on_storage(primary, sb, 0, r) for r in range(20, 30)))
        await m.drain()
        n.cancel_scope.cancel()
    assert await differing_regions(primary, secondary, sb) == []


async def test_a_write_backs_runs_ship_together(monkeypatch):
    """A write-back issues its runs one by one: they are gathered into one
    batch, rather than each put and read back on its own (on two cores
    that halved the write-back's speed; docs/BENCHMARKS-HISTORY.md, mirroring).
    The window is widened so that a slow machine still fits in it."""
    monkeypatch.setattr("sharedfs.mirror.SHIP_GATHER", 0.5)
    primary, secondary, sb = await mirrored_pair()
    m = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary)
    async with trio.open_nursery() as n:
        await n.start(m.run)
        for i in range(40):
            await m.write(data_offset(sb, 20 + i % 8) + i * 4096, bytes([i]) * 4096)
        await m.drain()
        n.cancel_scope.cancel()
    assert m.shipped == 40 and m.shipments == 1, m.shipments
    assert m.counters()["mirror_shipments"] == m.shipments
    assert await differing_regions(primary, secondary, sb) == []


async def test_a_backlog_ships_in_full_batches_without_waiting(monkeypatch):
    """Updates queued while nothing shipped (an outage, a burst) go in full
    batches at once: the gathering wait is for a batch that is not full."""
    monkeypatch.setattr("sharedfs.mirror.SHIP_GATHER", 60.0)
    primary, secondary, sb = await mirrored_pair()
    m = MirrorStorage(primary, sb, 0, open_secondary=lambda: secondary)
    for i in range(2 * SHIP_BATCH):
        await m.write(data_offset(sb, 20 + i % 8) + i * 4096, bytes([i % 256]) * 4096)
    with trio.fail_after(30):  # a wait of SHIP_GATHER would overrun it
        async with trio.open_nursery() as n:
            await n.start(m.run)
            while m.queued_bytes:  # noqa: ASYNC110 - no event for it
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    assert m.shipped == 2 * SHIP_BATCH and m.shipments == 2


async def test_a_fenced_host_leaves_its_marks_on_storage():
    """Its updates may still reach the secondary, but the primary gets no
    more writes from it, resets of its marks included: a resync copies
    those regions again."""
    primary, secondary, sb = await mirrored_pair()
    gate = Fence(primary)  # below the mirror, as a mount has it
    m = MirrorStorage(gate, sb, 1, open_secondary=lambda: secondary)
    r = 21
    await m.write(data_offset(sb, r), b"y" * 4096)
    gate.close_gate("cut off")
    async with trio.open_nursery() as n:
        await n.start(m.run)
        await until(lambda: not m.updates)
        await m.drain()
        n.cancel_scope.cancel()
    assert ("secondary write", data_offset(sb, r)) in primary.events
    assert [e for e in primary.events if e[0] == "primary write"] == [
        ("primary write", indicator_offset(sb, 1, r)),
        ("primary write", data_offset(sb, r)),
    ]
    assert on_storage(primary, sb, 1, r)
