"""Handoffs on real agents and caches (no FUSE): a host evicting blocks
moves them to the host with the most room, rather than let the cluster
lose them (seed 001: cache retention values compared, the lowest
dropped), and reads them back from there instead of storage."""

from __future__ import annotations

import dataclasses
import random

import trio
from cluster_util import cluster
from conftest import CTX, ROOT, make_volume

from sharedfs.fsck import run_fsck

BLOCK = 4096
CACHE = 1 << 20  # 256 blocks
SIZE = 3 * CACHE // 2  # one host's cache cannot hold it, two can


async def learned_of(fs, node: int) -> None:  # type: ignore[no-untyped-def]
    """Until the master has told `fs` what `node` has room for (Stats
    come once a second)."""
    with trio.fail_after(10):
        while node not in fs.cache.agent.retention:  # noqa: ASYNC110 - no event for it
            await trio.sleep(0.05)


async def scan(fs, ino: int, data: bytes) -> int:  # type: ignore[no-untyped-def]
    """Read the file whole on `fs`; the blocks it read from storage."""
    before = fs.cache.stats.misses
    for off in range(0, len(data), 16 * BLOCK):
        assert await fs.read(ino, off, 16 * BLOCK) == data[off : off + 16 * BLOCK]
    return fs.cache.stats.misses - before


async def scans(peer_reads: bool) -> tuple[list[int], dict[str, int], list[dict[str, int]]]:
    """Host 0 writes a file half again as big as its cache and reads it
    three times; host 1 does nothing.  Host 0's storage reads per pass,
    the master's counters, each host's cache counters."""
    vol = await make_volume()
    data = random.Random(7).randbytes(SIZE)
    async with cluster(vol, 2, peer_reads=peer_reads, cache_bytes=CACHE) as c:
        a, b = c.hosts
        if peer_reads:
            await learned_of(a, 1)
        f = await a.create(ROOT, b"big", 0o644, CTX)
        for off in range(0, SIZE, 16 * BLOCK):
            await a.write(f.ino, off, data[off : off + 16 * BLOCK])
        await a.fsync(f.ino)
        mark = len(vol.write_log)
        reads = [await scan(a, f.ino, data) for _ in range(3)]
        await trio.sleep(0.2)  # host 1's trim of what it was handed last
        # Moving blocks wrote none: only the log's header was written
        # meanwhile (each host's checkpoints).
        log_area = range(
            a.sb.journal_start * BLOCK, (a.sb.journal_start + a.sb.journal_blocks) * BLOCK
        )
        assert all(off in log_area for off, _ in vol.write_log[mark:])
        counters = dataclasses.asdict(c.directory.counters)
        caches = [
            dataclasses.asdict(h.cache.stats) | {"blocks": len(h.cache._bufs)} for h in c.hosts
        ]
        assert all(len(h.cache.offered) < 64 for h in c.hosts)
    f = await run_fsck(vol, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems
    return reads, counters, caches


async def test_an_idle_hosts_cache_keeps_what_a_busy_host_evicts():
    """Without peer reads every pass reads the file from storage (an LRU
    cache a sequential scan does not fit in keeps nothing it needs).  With
    them, what host 0 evicts goes to host 1 (which had room), host 0's
    next passes are shipped it from there, and host 1 keeps no more than
    its capacity."""
    off, counters, _ = await scans(peer_reads=False)
    assert counters["handoffs"] == 0
    on, counters, (ca, cb) = await scans(peer_reads=True)
    blocks = SIZE // BLOCK
    assert min(off[1:]) >= blocks * 9 // 10, off
    assert max(on[1:]) <= blocks // 10, on
    assert counters["handoffs"] >= blocks // 3 and ca["handed_off"] >= counters["handoffs"]
    assert cb["handed_in"] == counters["handoffs"] and cb["handed_off"] == 0
    assert counters["peer_reads"] >= blocks // 3
    assert cb["blocks"] <= CACHE // BLOCK


async def test_two_hosts_that_both_overflow_trade_blocks_within_their_capacities():
    """Both hosts scan files of their own, each half again its cache, at
    once: each hands the other what it evicts while the other's coldest
    is colder, and a block handed on is dropped, not handed back, when
    evicted unused (Buffer.last_chance).  Every read is right, neither
    cache grows past its capacity (but for offers in flight), and the
    volume is clean."""
    vol = await make_volume()
    rng = random.Random(8)
    async with cluster(vol, 2, peer_reads=True, cache_bytes=CACHE) as c:
        await learned_of(c.hosts[0], 1)
        await learned_of(c.hosts[1], 0)
        files = []
        for n, fs in enumerate(c.hosts):
            data = rng.randbytes(SIZE)
            f = await fs.create(ROOT, b"f%d" % n, 0o644, CTX)
            await fs.write(f.ino, 0, data)
            await fs.fsync(f.ino)
            files.append((fs, f.ino, data))

        async def loop(fs, ino, data) -> None:  # type: ignore[no-untyped-def]
            for _ in range(4):
                await scan(fs, ino, data)

        async with trio.open_nursery() as n:
            for args in files:
                n.start_soon(loop, *args)
        for fs in c.hosts:
            assert len(fs.cache._bufs) <= CACHE // BLOCK + 64
    f = await run_fsck(vol, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems
