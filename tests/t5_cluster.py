"""Several hosts on one volume through the real master and agents (no FUSE).

Protocol tests check the messages and storage writes that happened, not only
the bytes that came out.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import trio
import trio.lowlevel
from cluster_util import cluster
from conftest import CTX, ROOT, make_volume

from sharedfs import journal
from sharedfs.fsck import run_fsck
from sharedfs.protocol import Mode
from sharedfs.volume import read_superblock


async def settle(c) -> None:  # type: ignore[no-untyped-def]
    """Wait until the master has heard every PingDone: a transfer that was
    the grant lets the receiver go on before its sender reports."""
    with trio.fail_after(5):
        while any(st.acks or st.queue for st in c.directory.blocks.values()):  # noqa: ASYNC110 - no event for it
            await trio.sleep(0.01)


async def fsck_clean(storage) -> None:  # type: ignore[no-untyped-def]
    f = await run_fsck(storage, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems


async def test_a_file_written_on_one_host_reads_on_the_others():
    vol = await make_volume()
    async with cluster(vol, 3) as c:
        a, b, h3 = c.hosts
        f = await a.create(ROOT, b"shared", 0o644, CTX)
        await a.write(f.ino, 0, b"from A")
        assert (await b.lookup(ROOT, b"shared")).ino == f.ino
        assert await b.read(f.ino, 0, 100) == b"from A"
        await b.write(f.ino, 6, b", then B")
        assert await h3.read(f.ino, 0, 100) == b"from A, then B"
        assert await a.read(f.ino, 0, 100) == b"from A, then B"
    await fsck_clean(vol)


async def test_dirty_block_moves_host_to_host_without_storage_writes():
    """A -> B -> C: the block travels by ping, nobody writes it to storage,
    and A and B keep past images (claims 1, 37)."""
    vol = await make_volume()
    async with cluster(vol, 3, checkpoint_every=None) as c:
        a, b, h3 = c.hosts
        f = await a.create(ROOT, b"pp", 0o644, CTX)
        await a.write(f.ino, 0, b"a" * 4096)
        (blk,), _ = await a._map(await a._iget(f.ino), 0, 1)
        mark = len(vol.write_log)
        await b.write(f.ino, 0, b"b" * 10)
        await h3.write(f.ino, 0, b"c" * 5)
        # Only the log was written (its records go to storage before a block
        # they describe leaves its host); no block went to storage.
        sb = c.hosts[0].sb
        log_area = range(sb.journal_start * 4096, (sb.journal_start + sb.journal_blocks) * 4096)
        assert all(off in log_area for off, _ in vol.write_log[mark:]), "a transfer wrote a block"
        assert a.log.forces + b.log.forces >= 1
        await settle(c)
        assert blk in a.cache.pis and blk in b.cache.pis and blk not in h3.cache.pis
        st = c.directory.blocks[blk]
        assert st.owner == 2 and set(st.pis) == {0, 1}
        assert c.directory.counters.transfers >= 2
        assert await a.read(f.ino, 0, 12) == b"ccccc" + b"bbbbb" + b"aa"
    await fsck_clean(vol)


async def test_write_request_is_served_by_the_newest_copy_and_clears_past_images():
    """A asks for a write of a block C holds newer: C writes it; A's and B's
    PIs go (claims 19-23)."""
    vol = await make_volume()
    async with cluster(vol, 3, checkpoint_every=None) as c:
        a, b, h3 = c.hosts
        f = await a.create(ROOT, b"w", 0o644, CTX)
        await a.write(f.ino, 0, b"1" * 4096)
        await b.write(f.ino, 0, b"2" * 4096)
        await h3.write(f.ino, 0, b"3" * 4096)
        (blk,), _ = await a._map(await a._iget(f.ino), 0, 1)
        pi_version = a.cache.pis.newest(blk).version
        performs = c.directory.counters.write_performs
        await a.cache.agent.write_request([(blk, pi_version)])
        assert c.directory.counters.write_performs == performs + 1
        assert vol.read_sync(blk * 4096, 4096) == b"3" * 4096  # C's version, not A's
        assert blk not in a.cache.pis
        with trio.fail_after(5):  # B hears of it later, piggybacked or batched
            while blk in b.cache.pis:  # noqa: ASYNC110 - no event for it
                await trio.sleep(0.05)
        # A version already on storage: answered at once, no write (claim 18).
        avoided = c.directory.counters.writes_avoided
        await b.cache.agent.write_request([(blk, pi_version)])
        assert c.directory.counters.writes_avoided == avoided + 1
    await fsck_clean(vol)


async def test_a_host_that_cannot_write_everything_back_leaves_as_a_crashed_one():
    """A Bye says all a host changed is on storage.  One whose unmount left
    a block dirty leaves without it, and the master has the others rebuild
    what it held from storage and the log: nothing of it is lost."""
    vol = await make_volume()
    async with cluster(vol, 2, checkpoint_every=None) as c:
        a, b = c.hosts
        d = (await a.mkdir(ROOT, b"kept", 0o755, CTX)).ino
        await a.log.force()

        async def nothing(blocknos=None) -> int:  # type: ignore[no-untyped-def]
            return 0  # a write-back that gets nowhere

        a.cache.flush = nothing
        assert a.cache.dirty_count
        await a.destroy()
        c.forget(0)
        await c.wait_recovered(0)
        assert c.directory.counters.hosts_failed == 1
        assert (await b.lookup(ROOT, b"kept")).ino == d
    await fsck_clean(vol)


def writes_of(vol, blk: int, since: int) -> int:  # type: ignore[no-untyped-def]
    """How many storage writes since write_log[since] covered block `blk`."""
    return sum(1 for off, n in vol.write_log[since:] if off <= blk * 4096 < off + n)


async def one_block_file(fs, name: bytes, fill: bytes) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """A file of one block of `fill`, made on `fs`: (its inode, the block)."""
    ino = (await fs.create(ROOT, name, 0o644, CTX)).ino
    await fs.write(ino, 0, fill * 4096)
    (blk,), _ = await fs._map(await fs._iget(ino), 0, 1)
    return ino, blk


async def test_the_global_dirty_flag_decides_whether_a_write_asks_the_master():
    """Claims 24-31: a block only this host dirtied is written silently; one
    whose dirty version came from another host goes through the master, which
    tells the PI holders; written, it is local again."""
    vol = await make_volume()
    async with cluster(vol, 2, checkpoint_every=None) as c:
        a, b = c.hosts
        ino, blk = await one_block_file(a, b"g", b"a")
        asked, mark = c.directory.counters.write_requests, len(vol.write_log)
        await a.cache.flush([blk])
        assert writes_of(vol, blk, mark) == 1
        assert c.directory.counters.write_requests == asked, "a local block asked the master"

        await a.write(ino, 0, b"A")
        await b.write(ino, 1, b"B")  # the dirty version moves: A keeps a PI
        await settle(c)
        assert blk in a.cache.pis and b.cache._bufs[blk].role_global
        mark = len(vol.write_log)
        await b.cache.flush([blk])
        assert c.directory.counters.write_requests == asked + 1
        assert writes_of(vol, blk, mark) == 1
        assert vol.read_sync(blk * 4096, 3) == b"ABa"
        assert not b.cache._bufs[blk].role_global and not b.cache._bufs[blk].dirty
        with trio.fail_after(5):  # A hears of the write later, batched
            while blk in a.cache.pis:  # noqa: ASYNC110 - no event for it
                await trio.sleep(0.02)

        await b.write(ino, 2, b"b")  # dirtied again, only here: local
        mark = len(vol.write_log)
        await b.cache.flush([blk])
        assert writes_of(vol, blk, mark) == 1
        assert c.directory.counters.write_requests == asked + 1
    await fsck_clean(vol)


async def test_version_boundary_while_a_write_is_in_flight():
    """Claims 32-35, 41-45: a block that moves while its sender writes it
    carries the being-written version; the receiver keeps its PIs at or below
    that version apart from newer ones and drops them once the write lands."""
    vol = await make_volume()
    async with cluster(vol, 2, checkpoint_every=None) as c:
        a, b = c.hosts
        ino, blk = await one_block_file(a, b"vb", b"1")
        await b.write(ino, 0, b"2")
        await a.write(ino, 0, b"3")  # B now keeps a PI
        await settle(c)
        (b_old,) = b.cache.pis.of(blk)

        gate, at_gate = trio.Event(), trio.Event()
        real_write = vol.write

        async def gated_write(offset: int, data: bytes, *, fua: bool = False) -> None:
            if offset == blk * 4096:
                at_gate.set()
                await gate.wait()
            await real_write(offset, data, fua=fua)

        vol.write = gated_write  # type: ignore[method-assign]
        async with trio.open_nursery() as n:
            n.start_soon(a.cache.flush, [blk])  # global: through the master, A writes
            await at_gate.wait()
            being_written = a.cache._inflight[blk]
            await b.write(ino, 0, b"4")  # moves while A writes it
            assert c.directory.blocks[blk].writer == a.host
            try:
                await a.write(ino, 0, b"5")  # and back: B keeps a second PI
                await settle(c)
                versions = [pi.version for pi in b.cache.pis.of(blk)]
            finally:
                gate.set()
            assert versions[0] == b_old.version <= being_written < versions[1], (
                versions,
                b_old.version,
                being_written,
            )
        vol.write = real_write  # type: ignore[method-assign]
        with trio.fail_after(5):  # the write landed: the older PI goes
            while [pi.version for pi in b.cache.pis.of(blk)] != versions[1:]:  # noqa: ASYNC110 - no event for it
                await trio.sleep(0.02)
        assert vol.read_sync(blk * 4096, 1) == b"3"  # what A was writing
        assert await b.read(ino, 0, 1) == b"5"
    await fsck_clean(vol)


async def test_a_bin_write_covers_the_past_images_of_a_closed_bin():
    """Claims 2-5, 11-12: a checkpoint asks the master to write a closed bin
    in one request; the master has the holder of the newest version write
    it; the PIs go, and PIs of the open bin stay for the next checkpoint."""
    vol = await make_volume()
    async with cluster(vol, 2, checkpoint_every=None) as c:
        a, b = c.hosts
        ino, old = await one_block_file(a, b"old", b"a")
        await b.write(ino, 0, b"b")  # A: a PI of `old`, first dirtied now
        await settle(c)
        await a.cache.checkpoint()  # closes bin 0 (it holds that PI)
        assert a.cache.pis.closed_bins == 1 and old in a.cache.pis

        ino_new, new = await one_block_file(a, b"new", b"n")
        await b.write(ino_new, 0, b"m")  # A: a PI of `new`, in the open bin
        await settle(c)
        bins, mark = c.directory.counters.bin_writes, len(vol.write_log)
        b_writes = b.cache.stats.storage_writes
        await a.cache.checkpoint()
        assert c.directory.counters.bin_writes == bins + 1
        assert a.cache.stats.bin_writes == 1
        assert writes_of(vol, old, mark) == 1 and writes_of(vol, new, mark) == 0
        assert b.cache.stats.storage_writes > b_writes  # B has the newest: B wrote
        assert vol.read_sync(old * 4096, 2) == b"ba"
        assert old not in a.cache.pis and new in a.cache.pis

        await a.cache.checkpoint()  # the next round covers the newer bin
        assert new not in a.cache.pis and not a.cache.pis
    await fsck_clean(vol)


async def test_concurrent_hosts_in_shared_directories():
    vol = await make_volume(128 << 20)
    async with cluster(vol, 3) as c:
        d = await c.hosts[0].mkdir(ROOT, b"shared", 0o755, CTX)
        expected: dict[bytes, bytes] = {}

        async def worker(h: int) -> None:
            fs = c.hosts[h]
            rng = random.Random(h)
            for i in range(60):
                name = b"h%d-%03d" % (h, i)
                data = bytes([65 + h]) * rng.randrange(1, 20000)
                f = await fs.create(d.ino, name, 0o644, CTX)
                await fs.write(f.ino, 0, data)
                expected[name] = data
                if i % 7 == 3:
                    await fs.unlink(d.ino, name)
                    del expected[name]
                elif i % 5 == 0:
                    await fs.rename(d.ino, name, ROOT, name)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as n:
            for h in range(3):
                n.start_soon(worker, h)
        for fs in c.hosts:
            for name, data in expected.items():
                for parent in (d.ino, ROOT):
                    try:
                        a = await fs.lookup(parent, name)
                        break
                    except Exception:
                        continue
                else:
                    raise AssertionError(f"host {fs.host}: {name!r} is missing")
                assert await fs.read(a.ino, 0, len(data) + 1) == data
    await fsck_clean(vol)


async def test_appends_from_every_host_never_overwrite_each_other():
    vol = await make_volume()
    async with cluster(vol, 3) as c:
        f = await c.hosts[0].create(ROOT, b"log", 0o644, CTX)

        async def appender(h: int) -> None:
            for i in range(40):
                await c.hosts[h].write(f.ino, 0, b"host%d line %02d\n" % (h, i), append=True)

        async with trio.open_nursery() as n:
            for h in range(3):
                n.start_soon(appender, h)
        size = (await c.hosts[1].getattr(f.ino)).size
        lines = (await c.hosts[2].read(f.ino, 0, size)).splitlines()
        assert sorted(lines) == sorted(
            b"host%d line %02d" % (h, i) for h in range(3) for i in range(40)
        )
    await fsck_clean(vol)


async def test_disk_coherence_writes_before_every_transfer():
    vol = await make_volume()
    async with cluster(vol, 2, coherence="disk") as c:
        a, b = c.hosts
        f = await a.create(ROOT, b"d", 0o644, CTX)
        await a.write(f.ino, 0, b"x" * 4096)
        writes = vol.writes
        await b.write(f.ino, 0, b"y")
        assert vol.writes > writes
        assert not a.cache.pis and not b.cache.pis
        assert await a.read(f.ino, 0, 2) == b"yx"
    await fsck_clean(vol)


async def test_volume_is_clean_after_a_busy_tree_on_three_hosts():
    vol = await make_volume(128 << 20)
    async with cluster(vol, 3) as c:

        async def tree(h: int) -> None:
            fs = c.hosts[h]
            top = await fs.mkdir(ROOT, b"t%d" % h, 0o755, CTX)
            for i in range(10):
                sub = await fs.mkdir(top.ino, b"s%d" % i, 0o755, CTX)
                for j in range(10):
                    f = await fs.create(sub.ino, b"f%d" % j, 0o644, CTX)
                    await fs.write(f.ino, 0, b"%d/%d/%d" % (h, i, j) * 100)

        async with trio.open_nursery() as n:
            for h in range(3):
                n.start_soon(tree, h)
        # Every host lists every tree.
        for fs in c.hosts:
            for h in range(3):
                top = await fs.lookup(ROOT, b"t%d" % h)
                names = [e.name for e, _ in await fs.readdir(top.ino, 0)]
                assert sorted(names) == [b".", b".."] + sorted(b"s%d" % i for i in range(10))
    await fsck_clean(vol)


async def test_namespace_churn_with_concurrent_writeback_stays_consistent():
    """Directories made, filled, renamed and removed on three hosts while each
    host's write-back runs beside its operations (as in a mount): blocks
    shipped while being written, owners that change under write requests."""
    vol = await make_volume(256 << 20)
    async with cluster(vol, 3) as c:

        async def work(h: int) -> None:
            fs = c.hosts[h]
            rng = random.Random(h)
            for i in range(15):
                name = b"d%d-%d" % (h, i)
                d = await fs.mkdir(ROOT, name, 0o755, CTX)
                f = await fs.create(d.ino, b"f", 0o644, CTX)
                await fs.write(f.ino, 0, b"x" * rng.randrange(1, 9000))
                if rng.random() < 0.3:
                    await fs.unlink(d.ino, b"f")
                    await fs.rmdir(ROOT, name)
                elif rng.random() < 0.3:
                    await fs.rename(ROOT, name, ROOT, b"r" + name)

        async def writeback(h: int) -> None:
            while True:
                await trio.sleep(0.02)
                await c.hosts[h].cache.flush()

        async with trio.open_nursery() as bg:
            for h in range(3):
                bg.start_soon(writeback, h)
            async with trio.open_nursery() as n:
                for h in range(3):
                    n.start_soon(work, h)
            bg.cancel_scope.cancel()
        listed = {e.name for e, _ in await c.hosts[1].readdir(ROOT, 0, 1000)}
        root = await c.hosts[2].getattr(ROOT)
        assert root.nlink == 2 + len(listed - {b".", b".."})
    await fsck_clean(vol)


async def _churn(  # type: ignore[no-untyped-def]
    fs, node: int, shared: int, rng: random.Random, stop: trio.Event, done: trio.Event
) -> None:
    try:
        own = (await fs.mkdir(ROOT, f"own{node}".encode(), 0o755, CTX)).ino
        i = 0
        while not stop.is_set():
            i += 1
            parent = shared if i % 2 else own
            ino = (await fs.create(parent, f"{node}-{i}".encode(), 0o644, CTX)).ino
            await fs.write(ino, 0, bytes([i % 256]) * rng.randrange(1, 9000))
            if i % 3 == 0:
                await fs.fsync(ino)
    finally:
        done.set()


@pytest.mark.parametrize("seed", [7, 18])
async def test_hosts_unmounting_while_others_work_leave_the_log_empty(seed: int) -> None:
    """Each host unmounts while the others still change blocks it held: the
    dirty ones it ships during its unmount leave past images behind, which
    must be covered before it goes, or its mark stays in the log header and
    the log can never be truncated past it (seed 18 showed it)."""
    rng = random.Random(seed)
    vol = await make_volume(128 << 20)
    async with cluster(vol, 3, checkpoint_every=0.2) as c:
        shared = (await c.hosts[0].mkdir(ROOT, b"shared", 0o755, CTX)).ino
        stops = [trio.Event() for _ in c.hosts]
        dones = [trio.Event() for _ in c.hosts]
        async with trio.open_nursery() as n:
            for node, fs in enumerate(c.hosts):
                n.start_soon(_churn, fs, node, shared, rng, stops[node], dones[node])
            await trio.sleep(rng.uniform(0.3, 1.0))
            for node, fs in enumerate(c.hosts):
                stops[node].set()
                await dones[node].wait()  # as FUSE stops before a mount unmounts
                await fs.destroy()  # the others are still at work
                c.forget(node)
                await trio.sleep(rng.uniform(0.05, 0.3))
    sb = read_superblock(vol)
    header, _ = await journal.read_log(vol, sb)
    assert not any(header.low), header.low
    assert header.checkpoint_seq == header.next_seq  # nothing left to replay
    assert (await journal.replay(vol, sb, dry_run=True)).transactions == 0
    await fsck_clean(vol)


async def test_an_unmounting_host_leaves_no_mark_though_its_blocks_are_taken_meanwhile():
    """Host b takes host a's dirty directory blocks in the middle of a's
    unmount: a must still leave with nothing of its own unwritten, or its
    mark stays in the log header for good."""
    vol = await make_volume()
    async with cluster(vol, 2, checkpoint_every=None) as c:
        a, b = c.hosts
        shared = (await a.mkdir(ROOT, b"shared", 0o755, CTX)).ino
        await a.create(shared, b"from-a", 0o644, CTX)  # a's directory blocks are dirty
        covered = a.cache.write_past_images

        async def and_meanwhile() -> None:
            await covered()
            await b.create(shared, b"from-b", 0o644, CTX)  # wants a's directory now

        a.cache.write_past_images = and_meanwhile  # type: ignore[method-assign]
        await a.destroy()
        c.forget(0)
        header, _ = await journal.read_log(vol, c.sb)
        assert header.low[0] == 0
        assert (await b.lookup(shared, b"from-a")).ino


async def test_a_write_streaming_through_a_small_cache_registers_what_it_evicts():
    """Host 0 writes 4 MiB through a 512 KiB cache.  Every data block it
    allocates is registered with the master before it is evicted (another
    host may hold a stale copy from the block's last life: the next test),
    in a few requests, not one per block.  Host 1 then reads the file as
    written, and after host 0 changes a page of it, host 1 reads the
    change."""
    vol = await make_volume(64 << 20)
    async with cluster(vol, 2, cache_bytes=512 << 10, checkpoint_every=None) as c:
        fs0, fs1 = c.hosts
        ino = (await fs0.create(ROOT, b"big", 0o644, CTX)).ino
        rng = random.Random(3)
        data = rng.randbytes(4 << 20)
        before = c.directory.counters.blocks_requested
        requests = c.directory.counters.lock_requests
        for off in range(0, len(data), 128 << 10):
            await fs0.write(ino, off, data[off : off + (128 << 10)])
        await fs0.fsync(ino)
        registered = c.directory.counters.blocks_requested - before
        assert fs0.cache.stats.evictions > 800
        assert registered >= 900, registered  # of 1,024 data blocks written
        assert c.directory.counters.lock_requests - requests < 100
        ino1 = (await fs1.lookup(ROOT, b"big")).ino
        assert await fs1.read(ino1, 0, len(data)) == data
        await fs0.write(ino, 8192, b"changed")
        assert await fs1.read(ino1, 8190, 12) == data[8190:8192] + b"changed" + data[8199:8202]
    await fsck_clean(vol)


async def test_a_block_freed_and_allocated_again_elsewhere_is_never_read_stale():
    """Host 1 caches a file's data blocks; host 0 deletes the file and
    writes another into the same blocks, allocated privately (no lock),
    and evicts them clean before anything points at them elsewhere.  When
    host 1 reads the new file, it must read the new bytes, not the copy it
    kept from the old file: the blocks' registration revokes that copy."""
    vol = await make_volume(64 << 20)
    async with cluster(vol, 2, checkpoint_every=None) as c:
        fs0, fs1 = c.hosts
        old = (await fs0.create(ROOT, b"old", 0o644, CTX)).ino
        await fs0.write(old, 0, b"O" * 8192)
        await fs0.fsync(old)
        assert await fs1.read((await fs1.lookup(ROOT, b"old")).ino, 0, 8192) == b"O" * 8192
        blocks = set((await fs0._map(await fs0._iget(old), 0, 2))[0])
        assert all(b in fs1.cache._bufs for b in blocks)  # host 1 keeps read copies
        await fs0.unlink(ROOT, b"old")
        for fs in c.hosts:  # the kernels forget it: its blocks are freed
            await fs.forget([(old, fs.lookups.get(old, 0))])
        new = (await fs0.create(ROOT, b"new", 0o644, CTX)).ino
        await fs0.write(new, 0, b"N" * 8192)
        await fs0.fsync(new)
        reused = set((await fs0._map(await fs0._iget(new), 0, 2))[0])
        assert reused == blocks  # the allocator gave the freed blocks back
        # Host 0 evicts exactly those two data blocks, clean: they are the
        # coldest, and nothing that points at them is evicted with them.
        cache = fs0.cache
        for b in [b for b in cache._bufs if b not in blocks]:
            cache._bufs.move_to_end(b)
        cache.capacity = len(cache._bufs) - 2
        await cache.trim()
        assert not blocks & set(cache._bufs)
        assert await fs1.read((await fs1.lookup(ROOT, b"new")).ino, 0, 8192) == b"N" * 8192
    await fsck_clean(vol)


async def _alternate_reads(peer_reads: bool) -> tuple[int, int, dict[str, int]]:
    """Host 0 writes 3 MiB; then hosts 1, 0, 1, 0 each read it all, with
    2 MiB of cache each: the file fits the two caches, not one.  Returns
    the blocks read from storage during the reads, the transfers in, and
    the master's counters."""
    vol = await make_volume(64 << 20)
    async with cluster(vol, 2, cache_bytes=2 << 20, peer_reads=peer_reads) as c:
        fs0, fs1 = c.hosts
        data = random.Random(9).randbytes(3 << 20)
        ino = (await fs0.create(ROOT, b"set", 0o644, CTX)).ino
        await fs0.write(ino, 0, data)
        await fs0.fsync(ino)
        ino1 = (await fs1.lookup(ROOT, b"set")).ino
        before = [(fs.cache.stats.misses, fs.cache.stats.transfers_in) for fs in c.hosts]
        for fs, i in ((fs1, ino1), (fs0, ino), (fs1, ino1), (fs0, ino)):
            got = b"".join(
                [await fs.read(i, off, 256 << 10) for off in range(0, len(data), 256 << 10)]
            )
            assert got == data
        misses = sum(fs.cache.stats.misses - b[0] for fs, b in zip(c.hosts, before, strict=True))
        moved = sum(
            fs.cache.stats.transfers_in - b[1] for fs, b in zip(c.hosts, before, strict=True)
        )
        if peer_reads:
            copies = [fs.cache.stats.copies_evicted for fs in c.hosts]
            assert sum(copies) > 0, copies  # copies went first
        counters = dataclasses.asdict(c.directory.counters)
    await fsck_clean(vol)
    return misses, moved, counters


async def test_with_peer_reads_hosts_read_each_others_caches_instead_of_storage():
    """The same reads with the master's --peer-reads and without: with
    it, blocks the other host caches are shipped from there, each host
    evicts its copies first, and storage is read for a fraction of the
    blocks (seed 001's cluster-aware replacement)."""
    off_misses, off_moved, off = await _alternate_reads(False)
    on_misses, on_moved, on = await _alternate_reads(True)
    assert off["peer_reads"] == 0 and off["primaries_moved"] == 0
    assert on["peer_reads"] > 0
    assert on_moved > off_moved
    # Measured: 2,507 blocks from storage without, 260 with.
    assert on_misses * 3 < off_misses, (on_misses, off_misses)


async def test_a_block_asked_for_in_x_stays_cached_until_granted():
    """Host 1 holds a block in S and asks X for it; host 0's ping for it
    waits for host 0's running operation.  A trim on host 1 meanwhile must
    not evict the S copy: that Release goes after the request, and reached
    the master after the grant, which it undid: host 1 then held X on a
    block the master thought nobody held, and host 0 read it from storage
    (the soak's lost creates with --peer-reads and 4 MiB caches)."""
    vol = await make_volume()
    async with cluster(vol, 2) as c:
        a, b = c.hosts
        blk = a.sb.group_start(1) + 64  # a free block: raw, nobody's
        await a.cache.get(blk, Mode.S)
        await b.cache.get(blk, Mode.S)
        a.cache.begin_op()
        await a.cache.get(blk, Mode.S)  # pinned: the ping waits for the op
        async with trio.open_nursery() as n:
            got: list = []

            async def upgrade() -> None:
                got.append(await b.cache.get(blk, Mode.X))

            n.start_soon(upgrade)
            with trio.fail_after(5):
                while not c.directory.blocks[blk].acks:  # noqa: ASYNC110 - no event for it
                    await trio.sleep(0.01)
            b.cache.capacity = 0
            await b.cache.trim()
            assert blk in b.cache._bufs
            a.cache.end_op()
        (buf,) = got
        buf.data[:4] = b"new!"
        b.cache.mark_dirty(buf)
        await settle(c)
        await trio.sleep(0.2)  # host 1's batched Releases go out
        assert c.directory.blocks[blk].holders == {1: Mode.X}
        assert bytes((await a.cache.get(blk, Mode.S)).data[:4]) == b"new!"
